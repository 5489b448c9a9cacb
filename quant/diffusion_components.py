"""Quantizing a pipeline's components: the field's recipe per component and role
(``quant/ort.py``, ``quant/openvino.py``), each written as a manifest component,
and the quantized pipeline's manifest."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from enginekit.artifact import make_component
from enginekit.errors import QuantizationError
from enginekit.hardware import fingerprint
from enginekit.manifest import Component, Manifest
from enginekit.quant.base import MethodResult, QuantJob, QuantOptions


def run_method(backend: str, method: str, role: str, variant: str, job: QuantJob) -> MethodResult:
    from enginekit.quant import openvino as qov
    from enginekit.quant import ort

    if backend == "onnxruntime":
        if method == "fp16":
            return ort.fp16(job)
        if method == "int4":
            return ort.int4_weight(job)
        if method == "int8":
            return ort.int8_static(job) if (role == "denoiser" and variant == "static") else ort.int8_dynamic(job)
    else:
        if method == "fp32":
            return qov.fp32(job)
        if method == "fp16":
            return qov.fp16(job)
        if method == "int4":
            return qov.int4_weight(job)
        if method == "int8":
            return qov.int8_hybrid(job) if role == "denoiser" else qov.int8_weight(job)
    raise QuantizationError(f"no {method} recipe for a {role} on {backend}")


def quantize_component(root: Path, comp: Component, tmp: Path, backend: str, method: str, role: str, variant: str,
               calibration: list[dict[str, np.ndarray]] | None, options: QuantOptions) -> tuple[Component, dict]:
    rel = Path(comp.entry).parent
    if backend == "onnxruntime" and method == "fp32":
        for entry in comp.files:
            (tmp / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / entry.path, tmp / entry.path)
        return comp, {"method": "fp32"}
    job = QuantJob(root / comp.entry, tmp / rel, comp.inputs[0].name,
                   calibration if role == "denoiser" else None, options)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    result = run_method(backend, method, role, variant, job)
    files = [str(rel / f) for f in result.files]
    details = {k: v for k, v in result.details.items() if k != "inference_precision_hint"}
    details["method"] = method
    details["recipe"] = result.details.get("method", method)
    made = make_component(tmp, comp.name, str(rel / result.entry), files, comp.inputs, comp.outputs,
                          result.precision, quantization=details)
    return made, details


def pipeline_manifest(root: Path, parent: Manifest, backend: str, method: str, plan: Mapping[str, str],
              comps: Mapping[str, Component], details: Mapping[str, Any], calib: dict[str, Any] | None,
              variant: str, opts: QuantOptions, fallback: list[dict[str, Any]] | None) -> Manifest:
    from enginekit.runtimes.tasks.text_to_image import PipelineConfig

    denoiser = PipelineConfig.from_section(parent.task_config).denoiser
    quantization: dict[str, Any] = {"method": method, "backend": backend, "bits": {"fp16": 16, "int8": 8, "int4": 4}[method],
                                    "components": {n: dict(details[n]) for n in plan}}
    if variant:
        quantization["components"][denoiser]["variant"] = variant
    if calib is not None:
        quantization["calibration"] = calib
    if opts.awq or opts.scale_estimation:  # the denoiser's int4, calibrated on its recorded inputs
        quantization["data_aware"] = {"awq": opts.awq, "scale_estimation": opts.scale_estimation,
                                      "component": denoiser}
    if opts.exclude_nodes:
        quantization["excluded_nodes"] = list(opts.exclude_nodes)
    if fallback:
        quantization["fallback"] = {"steps": fallback, "excluded": len(opts.exclude_nodes)}
    if backend == "openvino":
        hint = "f32" if plan[denoiser] in ("fp32", "int8") else "default"
        target: dict[str, Any] = {"backend": "openvino", "device": "cpu", "inference_precision_hint": hint,
                                  "performance_hint": "LATENCY"}
    else:
        target = {"backend": "onnxruntime", "device": "cpu"}
    provenance = {**parent.provenance,
                  "parent": {"path": str(root.resolve()), "manifest_sha256": parent.digest(), "kind": parent.kind},
                  "host": fingerprint()}
    return parent.replace(kind="openvino" if backend == "openvino" else "onnx", components=dict(comps),
                          quantization=quantization, target=target, provenance=provenance, fidelity={})
