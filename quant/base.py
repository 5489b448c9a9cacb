"""The quantization contract: methods by backend, the job they run, what they return.

A method is a thin function over the field's own quantizer (onnxruntime.quantization,
nncf, onnxruntime's fp16 converter): it reads a float ONNX file, writes its result
into a folder, and says what it did. Calibration data, the fidelity gate, the
manifest and atomic writes are shared code in :mod:`enginekit.quant.api`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from enginekit.errors import QuantizationError

__all__ = [
    "QuantizationError",
    "QuantOptions",
    "QuantJob",
    "MethodResult",
    "QuantMethod",
    "METHODS",
    "get_method",
    "methods_for",
]


CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantOptions:
    """Every option a method may read; each method documents which ones it uses."""

    #: Static int8: how activation ranges are chosen from calibration data.
    calibrate_method: str = "minmax"
    #: Static int8: per-channel (per output channel) weight scales.
    per_channel: bool = True
    #: int4 weight-only: weights per scale (ORT block_size, NNCF group_size).
    group_size: int = 128
    #: int4 weight-only: symmetric (no zero point) or asymmetric.
    symmetric: bool = True
    #: NNCF int4: fraction of weights in int4, the rest int8 (1.0 = all int4).
    ratio: float = 1.0
    #: NNCF int4 weight compression (OpenVINO): AWQ's activation-aware scales, and scale
    #: estimation (scales that minimise the layer's L2 error); both calibrate on the job's data.
    awq: bool = False
    scale_estimation: bool = False
    #: Node names kept in float (ORT ``nodes_to_exclude``, NNCF ``IgnoredScope(names=...)``).
    exclude_nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantJob:
    """One run of a method."""

    #: The float ONNX model (the parent component's entry; external data beside it).
    model: Path
    #: An empty folder to write the result into.
    out_dir: Path
    #: Name of the model's single image input.
    input_name: str
    #: Preprocessed calibration inputs, (N, 3, H, W) float32 for a single-input model, or one
    #: feed dict per sample (a pipeline's denoiser: its recorded inputs at batch 2 and more);
    #: None for methods that need none.
    calibration: np.ndarray | Sequence[Mapping[str, np.ndarray]] | None
    options: QuantOptions = field(default_factory=QuantOptions)


@dataclass(frozen=True)
class MethodResult:
    """What a method wrote into ``job.out_dir``."""

    #: Artifact kind of the result: "onnx" (runs on ONNX Runtime) or "openvino".
    kind: str
    #: The file a backend opens, relative to out_dir.
    entry: str
    #: Every file written (entry included), relative to out_dir.
    files: tuple[str, ...]
    #: Component precision label: "int8", "int4", "fp16", "int8-qdq".
    precision: str
    #: Recorded verbatim under manifest["quantization"]: bits, granularity,
    #: format, the library and its version, the options it honoured.
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantMethod:
    """A registered method. ``target`` names the implementing function lazily."""

    name: str
    backend: str
    needs_calibration: bool
    #: Default fidelity budgets against the float parent.
    min_agreement: float
    min_cosine: float
    target: str
    description: str
    #: Takes ``QuantOptions.awq`` / ``scale_estimation`` (NNCF's data-aware int4 compression).
    data_aware: bool = False

    def load(self) -> Callable[[QuantJob], MethodResult]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


def _m(name: str, backend: str, calib: bool, agree: float, cos: float, target: str, desc: str,
       data_aware: bool = False) -> QuantMethod:
    return QuantMethod(name, backend, calib, agree, cos, target, desc, data_aware)


_ORT = "enginekit.quant.ort"
_OV = "enginekit.quant.openvino"
_MO = "enginekit.quant.modelopt"

#: (backend, method name) -> method. Budgets are where each method lands on
#: ViTs in our measurements with margin, not promises: tighten per model with
#: --min-agreement / --min-cosine.
METHODS: dict[tuple[str, str], QuantMethod] = {
    (m.backend, m.name): m
    for m in (
        _m("int8-dynamic", "onnxruntime", False, 0.95, 0.99, f"{_ORT}:int8_dynamic",
           "int8 weights, activations quantized on the fly (MatMul/Gemm)"),
        _m("int8-static", "onnxruntime", True, 0.95, 0.99, f"{_ORT}:int8_static",
           "int8 weights and activations in QDQ format, calibrated"),
        _m("int4-weight", "onnxruntime", False, 0.90, 0.98, f"{_ORT}:int4_weight",
           "int4 weight-only MatMulNBits (block size, symmetric or not)"),
        _m("fp16", "onnxruntime", False, 0.99, 0.999, f"{_ORT}:fp16",
           "fp16 weights and compute, float32 inputs and outputs kept"),
        _m("bf16", "onnxruntime", False, 0.98, 0.999, f"{_ORT}:bf16",
           "bf16 weights on disk, float32 compute"),
        _m("int8-static", "openvino", True, 0.95, 0.99, f"{_OV}:int8_static",
           "NNCF post-training int8, transformer preset"),
        _m("int8-weight", "openvino", False, 0.98, 0.995, f"{_OV}:int8_weight",
           "NNCF int8 weight compression"),
        _m("int4-weight", "openvino", False, 0.90, 0.98, f"{_OV}:int4_weight",
           "NNCF int4 weight compression (group size, ratio; AWQ and scale estimation on calibration data)",
           data_aware=True),
        _m("fp16", "openvino", False, 0.99, 0.999, f"{_OV}:fp16", "fp16 IR weights"),
        _m("int8-qdq", "tensorrt", True, 0.95, 0.99, f"{_ORT}:int8_qdq_tensorrt",
           "explicit QDQ int8 ONNX for TensorRT: symmetric, per-channel weights"),
        _m("int8-modelopt", "tensorrt", True, 0.95, 0.99, f"{_MO}:int8_qdq_modelopt",
           "int8 Q/DQ placed by NVIDIA Model Optimizer (TensorRT's recipe), calibrated"),
        _m("fp8-qdq", "tensorrt", True, 0.95, 0.99, f"{_MO}:fp8_qdq_modelopt",
           "fp8 (E4M3) Q/DQ by NVIDIA Model Optimizer, calibrated; GPUs of compute capability 8.9+"),
    )
}


def methods_for(backend: str) -> list[QuantMethod]:
    return [m for (b, _), m in METHODS.items() if b == backend]


def get_method(name: str, backend: str) -> QuantMethod:
    """Look up a method, with an error listing what the backend can do instead."""
    if (backend, name) in METHODS:
        return METHODS[(backend, name)]
    backends = sorted({b for b, _ in METHODS})
    if backend not in backends:
        raise QuantizationError(f"no quantization methods for backend {backend!r}; use one of: {', '.join(backends)}")
    offered = ", ".join(m.name for m in methods_for(backend))
    others = [b for (b, n) in METHODS if n == name]
    hint = f" ({name} exists for: {', '.join(others)})" if others else ""
    raise QuantizationError(f"backend {backend!r} cannot do {name!r}{hint}; it offers: {offered}")
