"""ONNX to OpenVINO's model, as ``ov.convert_model`` makes it, in steps that let the caller give
back mapped weights while the front end copies them (see :class:`enginekit.memory.ReleasingFilePages`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["convert_onnx"]


def convert_onnx(core: Any, path: Path) -> Any:
    """``ov.convert_model(path)`` for an ONNX file, in two steps: the front end's conversion
    (``Core.read_model``, which lets other Python threads run, so :class:`ReleasingFilePages` can
    give back the ONNX data's pages while it copies them) and then the transformations
    ``convert_model`` applies (``ovc``'s ``moc_emit_ir``, without preprocessing). The IR saved is
    the same as ``convert_model``'s but for generated node names."""
    import openvino as ov

    try:
        from openvino._offline_transformations import (
            apply_fused_names_cleanup,
            apply_moc_legacy_transformations,
            apply_moc_transformations,
            compress_quantize_weights_transformation,
        )
    except ImportError:  # a release that moved them: the one-step conversion
        return ov.convert_model(str(path))
    model = core.read_model(str(path))
    apply_moc_transformations(model, cf=False, smart_reshape=True)
    compress_quantize_weights_transformation(model)
    apply_moc_legacy_transformations(model, [])
    apply_fused_names_cleanup(model)
    return model
