"""One component's ``torch.onnx.export``: the dynamo exporter, TorchScript's where dynamo cannot
(or, for a UNet giving out DeepCache's feature, first: dynamo fails on that intermediate every
time), and every external tensor gathered into one ``model.onnx.data``."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

from enginekit.errors import ExportError, one_line
from enginekit.export.diffusion.deepcache import CACHE_OUTPUT
from enginekit.export.diffusion.streaming import DATA_FILE

__all__ = ["DATA_FILE", "_torch_export", "_one_data_file"]


def _torch_export(plan: Any, path: Path, opset: int, external: bool) -> str:
    """Export with the dynamo exporter, TorchScript's for this component where it fails (or first, for
    a UNet with DeepCache's output); which one ran."""
    import torch

    in_names = [s.name for s in plan.inputs]
    out_names = [s.name for s in plan.outputs]
    dyn = tuple({j: d for j, d in enumerate(s.shape) if isinstance(d, str)} for s in plan.inputs)
    sink = io.StringIO()

    def dynamo() -> None:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(plan.module, plan.example, str(path), input_names=in_names, output_names=out_names,
                              opset_version=opset, dynamo=True, dynamic_shapes=dyn, external_data=external,
                              verbose=False)

    def torchscript() -> None:
        axes = {s.name: {j: d for j, d in enumerate(s.shape) if isinstance(d, str)} for s in (*plan.inputs, *plan.outputs)}
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(plan.module, plan.example, str(path), input_names=in_names, output_names=out_names,
                              opset_version=opset, dynamo=False, dynamic_axes=axes)

    order = [("dynamo", dynamo), ("torchscript", torchscript)]
    if CACHE_OUTPUT in out_names:  # torch.export fails on DeepCache's intermediate: not worth the try first
        order.reverse()
    errors = []
    for exporter, run in order:
        try:
            run()
            break
        except Exception as exc:
            errors.append(f"{exporter}: {one_line(exc)}")
            for stale in path.parent.iterdir():
                stale.unlink()
    else:
        raise ExportError(f"torch.onnx.export of {plan.name} failed with both exporters: " + "; ".join(errors))
    if external or any(p.name != "model.onnx" for p in path.parent.iterdir()):
        _one_data_file(path)
    return exporter


def _one_data_file(path: Path) -> None:
    """Gather every external tensor into ``model.onnx.data`` beside ``model.onnx``, whatever the exporter wrote."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    locations = {next((e.value for e in t.external_data if e.key == "location"), "")
                 for t in _get_all_tensors(model) if uses_external_data(t)}
    others = {p.name for p in path.parent.iterdir()} - {"model.onnx"}
    if locations == {DATA_FILE} and others == {DATA_FILE}:
        return
    del model
    model = onnx.load(str(path), load_external_data=True)
    for stale in path.parent.iterdir():
        if stale.name != "model.onnx":
            stale.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
