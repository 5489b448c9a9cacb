"""Precision the TensorRT 11 way: in the ONNX, not in builder flags.

A strongly typed network runs every tensor at the type the ONNX gives it, so fp16 and bf16
are made in the graph before the build: NVIDIA Model Optimizer's ONNX AutoCast
(``modelopt.onnx.autocast.convert_to_mixed_precision``) converts it and keeps in fp32 the
nodes whose values or weights would overflow the low-precision type (its reference run on
ONNX Runtime CPU finds them; an SDXL VAE's up-blocks, say), with fp32 inputs and outputs.
int8 and fp8 are explicit Q/DQ made by ``enginekit quantize`` (``compile --int8/--fp8`` runs
it first, calibrated and gated; see :mod:`enginekit.quant.modelopt`).

Without Model Optimizer, fp16 falls back to ONNX Runtime's converter
(``onnxruntime.transformers.float16``, the project's ``quantize --method fp16``) and says so
in the manifest; bf16 then needs Model Optimizer.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from enginekit.errors import BackendError, one_line

__all__ = ["CONVERTED", "prepare_onnx", "modelopt_available"]

#: Precisions made in the ONNX at compile time (fp32: the graph as it is).
CONVERTED = ("fp16", "bf16")
MODELOPT_HINT = "pip install 'nvidia-modelopt[onnx]'"
#: Past protobuf's 2 GB a graph keeps its weights in one external file beside it.
_EXTERNAL = "model.onnx.data"


def modelopt_available() -> bool:
    try:
        return importlib.util.find_spec("modelopt.onnx.autocast") is not None
    except ModuleNotFoundError:
        return False


def _copy(source: Path, scratch: Path) -> Path:
    """The graph and its external data copied into ``scratch``: AutoCast and the quantizer
    write beside the file they read, and an artifact's files never change."""
    scratch.mkdir(parents=True, exist_ok=True)
    for item in source.parent.iterdir():
        if item.is_file() and (item == source or item.name.startswith(source.name) or item.suffix == ".data"):
            shutil.copy2(item, scratch / item.name)
    return scratch / source.name


def _save(model: Any, dest: Path) -> None:
    import onnx

    dest.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > 1_800_000_000 if hasattr(model, "ByteSize") else False
    onnx.save(model, str(dest), save_as_external_data=large, all_tensors_to_one_file=True,
              location=_EXTERNAL if large else None)


def prepare_onnx(source: Path, scratch: Path, precision: str) -> tuple[Path, dict[str, Any]]:
    """The ONNX file to build at ``precision`` and what was done to it (for the manifest).

    fp32 (and a graph that is already fp16 or Q/DQ): ``source`` itself. fp16/bf16: converted
    into ``scratch`` by AutoCast (ORT's fp16 converter without Model Optimizer)."""
    if precision not in CONVERTED:
        return source, {"conversion": "none"}
    dest = scratch / "prepared" / "model.onnx"
    if modelopt_available():
        from enginekit.runtimes.tensorrt_modelopt import ModeloptFailed, run_modelopt

        copy = _copy(source, scratch / "source")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:  # in a child process: Model Optimizer imports torch and patches onnxruntime
            run_modelopt("autocast", scratch / "job", source=str(copy), dest=str(dest), precision=precision)
        except ModeloptFailed as exc:
            raise BackendError(f"modelopt's AutoCast could not convert {source.name} to {precision}: {exc}") from None
        return dest, {"conversion": "modelopt.onnx.autocast.convert_to_mixed_precision",
                      "low_precision_type": precision, "keep_io_types": True, "modelopt_version": _version()}
    if precision == "bf16":
        raise BackendError(f"tensorrt: bf16 is made in the ONNX by NVIDIA Model Optimizer's AutoCast; {MODELOPT_HINT}")
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = onnx.load(str(source))
        converted = convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        raise BackendError(f"onnxruntime's fp16 converter failed on {source.name}: {one_line(exc)}") from exc
    _save(converted, dest)
    return dest, {"conversion": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True,
                  "note": f"Model Optimizer is not installed ({MODELOPT_HINT}): no overflow check, "
                          "ONNX Runtime's default op block list"}


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("nvidia-modelopt")
    except metadata.PackageNotFoundError:
        return None
