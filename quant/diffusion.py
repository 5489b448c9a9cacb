"""Quantized diffusion pipelines, gated on the image they make.

``quantize_pipeline`` takes a float ONNX pipeline (from ``enginekit export``) and
writes a quantized one for ONNX Runtime or OpenVINO:

1. plan a method per component (the denoiser gets the method asked for; text
   encoders int8 weight-only, or fp16 for fp16; the VAE stays fp32 unless the
   method is fp16 and the family's VAE survives fp16), with overrides;
2. record the denoiser's real inputs: the float parent generates the calibration
   prompts and every denoiser call is kept, sub-sampled over the whole step range;
3. quantize each component with the field's quantizer (``quant/ort.py``,
   ``quant/openvino.py``; :mod:`enginekit.quant.diffusion_components`) into a
   temporary folder;
4. gate on the image (:mod:`enginekit.quant.diffusion_gate`): the same prompts x seeds x latents through the quantized
   pipeline, the float parent and (when rebuildable) diffusers; PSNR and SSIM
   against both, per-component cosine on recorded feeds. Under budget nothing is
   written. ONNX Runtime's int8 denoiser tries static QDQ activations first and
   falls back to weight-only int8 when the image misses; ``auto_fallback`` then
   keeps the denoiser's most sensitive layers in float, group by group.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from enginekit.artifact import atomic_artifact, copy_assets, verify_artifact, write_manifest
from enginekit.errors import FidelityError, InputError, QuantizationError
from enginekit.manifest import Component, Manifest, read_manifest
from enginekit.quant.base import QuantJob, QuantOptions
from enginekit.quant.diffusion_components import pipeline_manifest, quantize_component
from enginekit.quant.diffusion_gate import (
    GateReference,
    GateSpec,
    Missed,
    check_budget,
    gate_report,
    open_pipeline,
    rebuildable,
    record,
    reference_images,
    subsample,
)
from enginekit.registry import expect_stage, task_stages
from enginekit.registry import stage as task_stage
from enginekit.stages import with_fields

__all__ = ["quantize_pipeline", "PipelineQuantOptions", "BUDGETS", "METHODS", "default_plan", "read_prompts",
           "GateSpec"]

#: What ``-m`` takes for a pipeline, and what a component may be set to.
METHODS = ("fp16", "int8", "int4")
COMPONENT_METHODS = ("fp32", "fp16", "int8", "int4")
#: Default image budgets vs the float parent: (min PSNR dB, min SSIM) on the worst gate image.
#: Measured on the tiny built-ins (see README: quantized pipelines), with margin.
BUDGETS: Mapping[str, tuple[float, float]] = {"fp16": (35.0, 0.98), "bf16": (30.0, 0.95), "int8": (28.0, 0.90),
                                              "int4": (22.0, 0.80)}
#: At most this many recorded denoiser feeds calibrate a quantizer.
MAX_CALIBRATION_FEEDS = 64


@dataclass(frozen=True)
class PipelineQuantOptions:
    """How :func:`quantize_pipeline` quantizes and judges a pipeline, beside the method."""

    backend: str = "onnxruntime"
    #: Method per component, over the plan (``{"vae_decoder": "fp16"}``).
    components: Mapping[str, str] | None = None
    #: A prompts file (one per line); None: the built-in list.
    calibration: str | Path | None = None
    #: How many calibration prompts are generated to record the denoiser's inputs.
    calibration_prompts: int = 8
    #: Steps per calibration prompt; None: the gate's steps.
    calibration_steps: int | None = None
    group_size: int = 128
    ratio: float = 1.0
    #: int4: symmetric weights (no zero points).
    symmetric: bool = True
    #: OpenVINO int4 denoiser: NNCF's AWQ and scale estimation, calibrated on the denoiser's inputs
    #: recorded from the calibration prompts (the other components are compressed data-free).
    awq: bool = False
    scale_estimation: bool = False
    #: Image budget on the worst gate image vs the float parent; None: :data:`BUDGETS`.
    min_psnr: float | None = None
    min_ssim: float | None = None
    #: Keep the denoiser's most sensitive int8 layers in float until the image holds.
    auto_fallback: bool = False
    overwrite: bool = False
    #: False: no gate runs (the caller judges the result) and ``fidelity`` stays empty.
    check_fidelity: bool = True
    #: "auto" (float parent, and diffusers when rebuildable), "parent" or "diffusers".
    reference: str = "auto"
    gate: GateSpec = field(default_factory=GateSpec)


def builtin_prompts() -> list[str]:
    text = importlib.resources.files("enginekit.quant").joinpath("prompts.txt").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def read_prompts(calibration: str | Path | None) -> tuple[list[str], dict[str, Any]]:
    """The calibration prompts (one per line) and how they are recorded; None: the built-in list."""
    if calibration is None:
        prompts, source = builtin_prompts(), "builtin prompts (enginekit/quant/prompts.txt)"
    else:
        path = Path(calibration)
        if not path.is_file():
            raise InputError(f"{path}: no such prompts file (give a text file with one prompt per line)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not a UTF-8 text file of prompts (one prompt per line)") from None
        prompts, source = [ln.strip() for ln in text.splitlines() if ln.strip()], str(path)
        if not prompts:
            raise InputError(f"{path}: the prompts file is empty (give one prompt per line)")
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return prompts, {"source": source, "prompts": len(prompts), "sha256": digest}


def default_plan(manifest: Manifest, method: str) -> tuple[dict[str, str], dict[str, str]]:
    """(component -> method, component -> why it differs from the method) for ``method``."""
    from enginekit.runtimes.tasks.text_to_image import PipelineConfig

    cfg = PipelineConfig.from_section(manifest.task_config)
    encoders = {e.component for e in cfg.text_encoders}
    vae_fp32 = cfg.extra.get("vae_precision") == "fp32"
    plan: dict[str, str] = {}
    notes: dict[str, str] = {}
    for name in manifest.components:
        if name == cfg.denoiser:
            plan[name] = method
        elif name in encoders:
            plan[name] = "fp16" if method == "fp16" else "int8"
        elif name.startswith("vae"):
            if method == "fp16" and vae_fp32:
                plan[name] = "fp32"
                notes[name] = f"the {manifest.family} VAE overflows in fp16: kept fp32"
            else:
                plan[name] = "fp16" if method == "fp16" else "fp32"
        else:
            plan[name] = "fp32"
    return plan, notes


def _plan(manifest: Manifest, method: str, overrides: Mapping[str, str] | None) -> tuple[dict[str, str], dict[str, str]]:
    if method not in METHODS:
        raise QuantizationError(f"unknown method {method!r} for a pipeline; use one of: {', '.join(METHODS)}")
    plan, notes = default_plan(manifest, method)
    for name, value in (overrides or {}).items():
        if name not in manifest.components:
            raise QuantizationError(f"unknown component {name!r}; this {manifest.family} pipeline has: "
                                    f"{', '.join(manifest.components)}")
        if value not in COMPONENT_METHODS:
            raise QuantizationError(f"unknown method {value!r} for component {name!r}; use one of: "
                                    f"{', '.join(COMPONENT_METHODS)}")
        plan[name] = value
        notes[name] = "set by the caller"
    return plan, notes


# -- the run -----------------------------------------------------------------------


def quantize_pipeline(artifact: str | Path, out_dir: str | Path, method: str,
                      options: PipelineQuantOptions = PipelineQuantOptions(), *,
                      on_step: Callable[[str], None] = lambda msg: None, **overrides: Any) -> Manifest:
    """Quantize the float ONNX pipeline ``artifact`` with ``method`` (fp16, int8, int4) for
    ``options.backend`` into ``out_dir``, gated on the image.

    ``options`` (or its fields by keyword, over ``options``): ``components`` overrides the
    method per component (``{"vae_decoder": "fp16"}``); ``calibration`` is a prompts file
    (one per line; default the built-in list), of which ``calibration_prompts`` are
    generated with ``calibration_steps`` steps (default: the gate's steps) to record the
    denoiser's inputs. The result's worst gate image must keep ``min_psnr`` dB and
    ``min_ssim`` against the float parent (defaults in :data:`BUDGETS` by the denoiser's
    method); else :class:`FidelityError` names the numbers and nothing is written.
    ``reference``: "auto" (float parent, and diffusers when the weights can be rebuilt from
    provenance), "parent" or "diffusers".
    """
    opts = with_fields(PipelineQuantOptions, options, overrides)
    root = Path(artifact)
    parent = _float_parent(root, opts)
    plan, notes = _plan(parent, method, opts.components)
    from enginekit.quant.vocabulary import check_data_aware
    from enginekit.runtimes.tasks.text_to_image import PipelineConfig

    denoiser = PipelineConfig.from_section(parent.task_config).denoiser
    check_data_aware(parent.task, opts.backend, plan[denoiser], awq=opts.awq, scale_estimation=opts.scale_estimation,
                     dataset=str(opts.calibration or "builtin"))
    data_aware = opts.awq or opts.scale_estimation
    if opts.auto_fallback and plan[denoiser] != "int8":
        raise QuantizationError(f"--auto-fallback keeps int8 layers of the denoiser in float; the {denoiser} is "
                                f"{plan[denoiser]} here")
    if opts.calibration_prompts < 1:
        raise InputError(f"calibration_prompts must be at least 1, got {opts.calibration_prompts}")
    default = BUDGETS.get(plan[denoiser], BUDGETS["fp16"])
    budget = (default[0] if opts.min_psnr is None else float(opts.min_psnr),
              default[1] if opts.min_ssim is None else float(opts.min_ssim))
    prompts = read_prompts(opts.calibration)  # a bad prompts file fails before any work, whatever the method
    float_pipe = open_pipeline(root, parent, "onnxruntime")
    try:
        calib, calib_record = (_calibration(float_pipe, prompts, denoiser, opts, on_step)
                               if plan[denoiser] == "int8" or data_aware else (None, None))
        ref = (reference_images(parent, float_pipe, opts.gate, opts.reference, on_step)
               if opts.check_fidelity else None)
        run = _Run(root, parent, Path(out_dir), method, plan, notes, denoiser, calib, calib_record, opts, budget,
                   ref, float_pipe, on_step)
        return _variants(run)
    finally:
        float_pipe.close()


def _float_parent(root: Path, opts: PipelineQuantOptions) -> Manifest:
    """The float ONNX pipeline at ``root``, checked against what ``opts`` asks of it."""
    parent = read_manifest(root)
    verify_artifact(root, parent)
    expect_stage(parent.task, "quantize", "enginekit.quant.api:quantize_text_to_image")
    if parent.kind != "onnx" or parent.quantization:
        raise QuantizationError(f"{root}: quantize takes a float ONNX pipeline (from export), this one is "
                                f"{parent.kind}{' ' + str(parent.quantization.get('method')) if parent.quantization else ''}")
    if opts.backend not in ("onnxruntime", "openvino"):
        raise QuantizationError(f"pipelines quantize for onnxruntime or openvino, not {opts.backend!r}")
    if opts.reference not in ("auto", "parent", "diffusers"):
        raise InputError(f"reference must be 'auto', 'parent' or 'diffusers', got {opts.reference!r}")
    if opts.reference == "diffusers" and not rebuildable(parent):
        raise InputError(f"{root}: diffusers can rebuild only seeded built-ins and --random-weights exports; "
                         "use reference='parent'")
    return parent


def _calibration(float_pipe: Any, prompts_read: tuple[list[str], dict[str, Any]], denoiser: str,
                 opts: PipelineQuantOptions, on_step: Callable[[str], None],
                 ) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """The denoiser's recorded feeds (sub-sampled over every step) and how they were recorded;
    ``prompts_read`` as :func:`read_prompts` returns it."""
    prompts, prompt_record = prompts_read
    steps = opts.calibration_steps or opts.gate.steps
    chosen = prompts[:opts.calibration_prompts]
    calls = record(float_pipe, chosen, steps, on_step, keep=lambda c: c == denoiser)
    recorded = calls.get(denoiser, [])
    calib = subsample(recorded, MAX_CALIBRATION_FEEDS)
    return calib, {**prompt_record, "prompts_used": len(chosen), "steps": steps,
                   "denoiser_calls": len(recorded), "samples": len(calib),
                   "batch": int(next(iter(calib[0].values())).shape[0]) if calib else 0}


@dataclass(frozen=True)
class _Run:
    """One ``quantize_pipeline`` call: what every attempt (variant, excluded layers) shares."""

    root: Path
    parent: Manifest
    out_dir: Path
    method: str
    plan: Mapping[str, str]
    notes: Mapping[str, str]
    denoiser: str
    calib: list[dict[str, np.ndarray]] | None
    calib_record: dict[str, Any] | None
    opts: PipelineQuantOptions
    #: (min PSNR dB, min SSIM) on the worst gate image.
    budget: tuple[float, float]
    reference: GateReference | None
    float_pipe: Any
    on_step: Callable[[str], None]

    def attempt(self, variant: str, quant: QuantOptions, fallback: list[dict[str, Any]] | None) -> Manifest:
        """Quantize every component into a temporary folder and judge the image; :class:`Missed`
        (nothing written) when it misses the budget."""
        # The float engines are not needed while quantizing (NNCF holds its own copies of the
        # denoiser): free them; the cosines below load what they use again, on demand.
        self.float_pipe.close()
        backend = self.opts.backend
        with atomic_artifact(self.out_dir, overwrite=self.opts.overwrite, inputs=(self.root,)) as tmp:
            comps: dict[str, Component] = {}
            details: dict[str, Any] = {}
            for name, comp in self.parent.components.items():
                role = "denoiser" if name == self.denoiser else "component"
                self.on_step(f"{name}: {self.plan[name]} ({backend})")
                made, det = quantize_component(self.root, comp, tmp, backend, self.plan[name], role, variant,
                                               self.calib,
                                               quant if role == "denoiser" else replace(quant, exclude_nodes=(),
                                                                                        awq=False,
                                                                                        scale_estimation=False))
                if name in self.notes:
                    det["note"] = self.notes[name]
                comps[name], details[name] = made, det
            copy_assets(self.root, tmp, self.parent)
            manifest = pipeline_manifest(self.root, self.parent, backend, self.method, self.plan, comps, details,
                                         self.calib_record, variant, quant, fallback)
            if task_stages(manifest.task).relink:  # the LoRA weight map, in the quantized engines' names
                manifest = task_stage(manifest.task, "relink")(self.root, self.parent, tmp, manifest)
            write_manifest(tmp, manifest)
            if self.reference is None:
                return manifest
            self.on_step("generating the gate images with the quantized pipeline")
            pipe = open_pipeline(tmp, manifest, backend)
            try:
                report = gate_report(self.float_pipe, pipe, self.reference, self.opts.gate, self.plan, self.budget)
            finally:
                pipe.close()
            manifest = manifest.replace(fidelity=report)
            write_manifest(tmp, manifest)
            check_budget(report, self.opts.gate,
                         f"{self.method} pipeline ({backend}{', ' + variant if variant else ''})")
        return manifest


def _variants(run: _Run) -> Manifest:
    """ONNX Runtime's int8 denoiser: static QDQ first, then weight-only; then, with
    ``auto_fallback``, layers kept in float. Other methods: one attempt."""
    plan, denoiser = run.plan, run.denoiser
    options = QuantOptions(group_size=run.opts.group_size, ratio=run.opts.ratio, symmetric=run.opts.symmetric,
                           awq=run.opts.awq, scale_estimation=run.opts.scale_estimation)
    ort_int8 = run.opts.backend == "onnxruntime" and plan[denoiser] == "int8"
    variants = (["static", "weight-only"] if run.opts.check_fidelity else ["weight-only"]) if ort_int8 else [""]
    tried: list[dict[str, Any]] = []
    last: Missed | None = None
    for variant in variants:
        try:
            return run.attempt(variant, options, tried or None)
        except Missed as miss:
            tried.append({"variant": variant or plan[denoiser], "psnr_db": miss.report["vs_parent"]["psnr_db"],
                          "ssim": miss.report["vs_parent"]["ssim"]})
            last = miss
            run.on_step(str(miss))
    assert last is not None
    if not run.opts.auto_fallback:
        method = plan[denoiser]
        tries = (["--auto-fallback (keeps the denoiser's layers that hurt the image most in float)"]
                 if method == "int8" else [])
        tries += {"int4": ["smaller int4 groups (--group-size 32) or, on openvino, part in int8 (--ratio 0.8)",
                           "-m int8"],
                  "int8": ["-m fp16"]}.get(method, [])
        tries.append(f"--component {denoiser}=fp16 (the rest as asked)" if method != "fp16" else
                     "another backend (-b)")
        tries.append("a weaker budget if the numbers above are good enough for you (--min-psnr, --min-ssim)")
        raise FidelityError(str(last) + (f" (tried: {', '.join(t['variant'] for t in tried)})"
                                         if len(tried) > 1 else "") + ". To try: " + "; ".join(tries)) from None
    return _fallback(run, options, tried)


def _fallback(run: _Run, options: QuantOptions, tried: list[dict[str, Any]]) -> Manifest:
    """Keep the denoiser's most sensitive quantized layers in float, a tenth at a time, until the image holds."""
    calib, denoiser, on_step = run.calib, run.denoiser, run.on_step
    assert calib is not None
    on_step("ranking the denoiser's layers by the error quantizing them causes")
    comp = run.parent.component(denoiser)
    probe = subsample(calib, 8)
    with tempfile.TemporaryDirectory(prefix="enginekit-sensitivity-") as scratch:
        job = QuantJob(run.root / comp.entry, Path(scratch), comp.inputs[0].name, calib, options)
        if run.opts.backend == "onnxruntime":
            from enginekit.quant.ort import sensitivity

            ranking = sensitivity(job, probe)
            variant = "static"
        else:
            from enginekit.quant.openvino import sensitivity as ov_sensitivity

            ranking = ov_sensitivity(job, probe, hybrid=True)
            variant = ""
    if not ranking:
        raise QuantizationError(f"the {denoiser} has no quantized layers to keep in float")
    group = max(1, math.ceil(len(ranking) / 10))
    steps: list[dict[str, Any]] = [dict(t, excluded=0) for t in tried]
    excluded: list[str] = []
    for start in range(0, len(ranking), group):
        excluded += [name for name, _ in ranking[start:start + group]]
        on_step(f"keeping {len(excluded)} of {len(ranking)} {denoiser} layers in float")
        try:
            return run.attempt(variant, replace(options, exclude_nodes=tuple(excluded)), steps)
        except Missed as miss:
            steps.append({"variant": variant or "hybrid", "excluded": len(excluded),
                          "psnr_db": miss.report["vs_parent"]["psnr_db"], "ssim": miss.report["vs_parent"]["ssim"]})
    best = max(s["psnr_db"] for s in steps)
    raise FidelityError(f"the int8 pipeline misses its image budget even with all {len(ranking)} quantized "
                        f"{denoiser} layers kept in float (best PSNR {best:.2f} dB); nothing was written")
