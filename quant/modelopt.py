"""Explicit Q/DQ for TensorRT through NVIDIA Model Optimizer (``modelopt.onnx.quantization``).

TensorRT 11 builds only strongly typed networks: int8 and fp8 are ``QuantizeLinear`` /
``DequantizeLinear`` pairs in the ONNX, placed where TensorRT fuses them. Model Optimizer's
ONNX quantizer is NVIDIA's own placement (the one its TensorRT recipes use); this module is
glue: it copies the float graph into scratch (the quantizer writes beside its input), hands it
the calibration samples the other static methods use, and records what it did. The result
runs on ONNX Runtime CPU too, which is where the fidelity gate measures it here.

``compile -b tensorrt --int8`` / ``--fp8`` run these first (calibrated, gated), then build.
"""

from __future__ import annotations

import shutil
from typing import Any, Mapping, Sequence

import numpy as np

from enginekit.errors import QuantizationError
from enginekit.quant.base import MethodResult, QuantJob
from enginekit.quant.ort_graph import ENTRY, op_count, scratch_dir, written_files

__all__ = ["int8_qdq_modelopt", "fp8_qdq_modelopt", "MODELOPT_HINT"]

MODELOPT_HINT = "pip install 'nvidia-modelopt[onnx]' (or enginekit[modelopt])"
#: Model Optimizer's calibration methods for int8/fp8, and ours mapped onto them.
_CALIBRATION = {"minmax": "max", "entropy": "entropy"}


def _calibration(job: QuantJob) -> dict[str, np.ndarray]:
    """The job's samples as Model Optimizer takes them: input name -> all samples stacked."""
    data = job.calibration
    if data is None or (isinstance(data, np.ndarray) and len(data) == 0):
        raise QuantizationError("Model Optimizer's Q/DQ calibrates: give --calibration")
    if isinstance(data, np.ndarray):
        return {job.input_name: np.ascontiguousarray(data)}
    feeds: Sequence[Mapping[str, np.ndarray]] = data
    return {name: np.concatenate([np.asarray(f[name]) for f in feeds]) for name in feeds[0]}


def _run(job: QuantJob, mode: str) -> MethodResult:
    from enginekit.runtimes.tensorrt_modelopt import ModeloptFailed, run_modelopt
    from enginekit.runtimes.tensorrt_precision import modelopt_available

    if not modelopt_available():
        alt = " or --method int8-qdq (ONNX Runtime's quantizer)" if mode == "int8" else ""
        raise QuantizationError(f"{mode} Q/DQ for TensorRT needs NVIDIA Model Optimizer: {MODELOPT_HINT}{alt}")
    method = _CALIBRATION.get(job.options.calibrate_method)
    if method is None:
        raise QuantizationError(f"Model Optimizer calibrates with {' or '.join(_CALIBRATION)}, "
                                f"not {job.options.calibrate_method!r}")
    calibration = _calibration(job)
    with scratch_dir(job) as scratch:
        source = scratch / job.model.name
        for item in job.model.parent.iterdir():  # the graph and its external data: it writes beside them
            if item.is_file() and (item == job.model or item.name.startswith(job.model.name)):
                shutil.copy2(item, scratch / item.name)
        try:  # in a child process: Model Optimizer patches onnxruntime.quantization for good
            run_modelopt("quantize", scratch / "job", calibration, source=str(source), mode=mode, method=method,
                         dest=str(job.out_dir / ENTRY), exclude=list(job.options.exclude_nodes),
                         external=source.stat().st_size > 1_800_000_000)
        except ModeloptFailed as exc:
            raise QuantizationError(f"Model Optimizer's {mode} quantizer failed on {job.model.name}: {exc}") from None
    if not (job.out_dir / ENTRY).is_file():
        raise QuantizationError(f"Model Optimizer's {mode} quantizer wrote no {ENTRY}")
    pairs = op_count(job.out_dir / ENTRY, "QuantizeLinear")
    return MethodResult(kind="onnx", entry=ENTRY, files=written_files(job.out_dir), precision=f"{mode}-qdq",
                        details=_details(mode, method, len(next(iter(calibration.values()))), pairs, job))


def _details(mode: str, method: str, samples: int, pairs: int, job: QuantJob) -> dict[str, Any]:
    from importlib import metadata

    return {"method": f"{mode}-modelopt" if mode == "int8" else "fp8-qdq", "target": "tensorrt", "bits": 8,
            "format": "QDQ", "weights": f"{mode} per-channel", "activations": f"{mode} per-tensor, calibrated",
            "calibrate_method": method, "calibration_samples": samples, "quantize_linear_nodes": pairs,
            "high_precision_dtype": "fp32", "excluded_nodes": list(job.options.exclude_nodes),
            "library": "modelopt.onnx.quantization", "modelopt_version": metadata.version("nvidia-modelopt")}


def int8_qdq_modelopt(job: QuantJob) -> MethodResult:
    """int8 Q/DQ by Model Optimizer (TensorRT's own placement), calibrated ("minmax" -> its
    "max", or "entropy"). Options: ``calibrate_method``, ``exclude_nodes``."""
    return _run(job, "int8")


def fp8_qdq_modelopt(job: QuantJob) -> MethodResult:
    """fp8 (E4M3) Q/DQ by Model Optimizer, for GPUs with fp8 (compute capability 8.9 and up).
    Options: ``calibrate_method``, ``exclude_nodes``."""
    return _run(job, "fp8")

