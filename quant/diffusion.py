"""Quantized diffusion pipelines, gated on the image they make.

``quantize_pipeline`` takes a float ONNX pipeline (from ``enginekit export``) and
writes a quantized one for ONNX Runtime or OpenVINO:

1. plan a method per component (the denoiser gets the method asked for; text
   encoders int8 weight-only, or fp16 for fp16; the VAE stays fp32 unless the
   method is fp16 and the family's VAE survives fp16), with overrides;
2. record the denoiser's real inputs: the float parent generates the calibration
   prompts and every denoiser call is kept, sub-sampled over the whole step range;
3. quantize each component with the field's quantizer (``quant/ort.py``,
   ``quant/openvino.py``) into a temporary folder;
4. gate on the image: the same prompts x seeds x latents through the quantized
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
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from enginekit.artifact import atomic_artifact, copy_assets, make_component, verify_artifact, write_manifest
from enginekit.errors import FidelityError, InputError, QuantizationError
from enginekit.fidelity import compare_outputs, psnr, ssim
from enginekit.hardware import fingerprint
from enginekit.manifest import Component, Manifest, read_manifest
from enginekit.quant.base import MethodResult, QuantJob, QuantOptions
from enginekit.registry import expect_stage

__all__ = ["quantize_pipeline", "BUDGETS", "METHODS", "default_plan", "read_prompts", "GateSpec"]

#: What ``-m`` takes for a pipeline, and what a component may be set to.
METHODS = ("fp16", "int8", "int4")
COMPONENT_METHODS = ("fp32", "fp16", "int8", "int4")
#: Default image budgets vs the float parent: (min PSNR dB, min SSIM) on the worst gate image.
#: Measured on the tiny built-ins (see README: quantized pipelines), with margin.
BUDGETS: Mapping[str, tuple[float, float]] = {"fp16": (35.0, 0.98), "int8": (28.0, 0.90), "int4": (22.0, 0.80)}
#: At most this many recorded denoiser feeds calibrate a quantizer.
MAX_CALIBRATION_FEEDS = 64
#: Feeds per component on which per-component cosine is measured.
COSINE_FEEDS = 4
NEGATIVE = "blurry, low quality"


@dataclass(frozen=True)
class GateSpec:
    """What the image gate generates: every prompt with every seed."""

    prompts: tuple[str, ...] = ("a lighthouse on a cliff at dusk, oil painting",
                                "a red fox sleeping in fresh snow, wildlife photograph")
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 4
    #: Square side in pixels; None: the model's default size.
    size: int | None = None


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


# -- running pipelines -------------------------------------------------------------


def _open(root: Path, manifest: Manifest, backend: str) -> Any:
    from enginekit.api import Components
    from enginekit.registry import get_backend
    from enginekit.runtimes.tasks.text_to_image import TextToImage

    return TextToImage(Components(root, manifest, get_backend(backend), "cpu"), manifest, root)


def _gate_call(pipe: Any, gate: GateSpec) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """Call arguments and (prompt, latents) per gate image: seeded latents in diffusers' layout."""
    cfg = pipe.config
    size = gate.size or cfg.default_size
    layout = pipe.layout
    call = {"num_inference_steps": gate.steps, "guidance_scale": _guidance(layout), "height": size,
            "width": size, "negative_prompt": _negative(layout)}
    jobs = []
    for prompt in gate.prompts:
        for seed in gate.seeds:
            lat = np.random.default_rng(seed).standard_normal(layout.unpacked_shape(1, size, size), dtype=np.float32)
            jobs.append((prompt, layout.pack(lat)))
    return call, jobs


def _generate(pipe: Any, gate: GateSpec) -> np.ndarray:
    call, jobs = _gate_call(pipe, gate)
    scheduler = "flow-euler" if pipe.config.is_flow else "euler"
    return np.concatenate([pipe(p, latents=lat, scheduler=scheduler, output_type="np", **call).images
                           for p, lat in jobs])


def _diffusers_images(manifest: Manifest, pipe: Any, gate: GateSpec) -> np.ndarray:
    """The same prompts, latents, scheduler and steps through diffusers' PyTorch pipeline."""
    import diffusers
    import torch

    from enginekit.export.diffusion.reference import reference_pipeline

    dpipe = reference_pipeline(manifest)
    cls = diffusers.FlowMatchEulerDiscreteScheduler if pipe.config.is_flow else diffusers.EulerDiscreteScheduler
    dpipe.scheduler = cls.from_config(dpipe.scheduler.config)
    dpipe.set_progress_bar_config(disable=True)
    call, jobs = _gate_call(pipe, gate)
    with torch.inference_mode():
        return np.concatenate([dpipe(p, latents=torch.from_numpy(lat), output_type="np", **call).images
                               for p, lat in jobs])


def _negative(layout: Any) -> str | None:
    """The negative prompt calibration and the gate use: none for a guidance-distilled model."""
    return NEGATIVE if layout.takes_negative_prompt else None


def _guidance(layout: Any) -> float:
    """CFG 7.5, or the layout's own reference guidance (FLUX's distilled 3.5)."""
    return layout.reference_guidance if layout.reference_guidance is not None else 7.5


def _rebuildable(manifest: Manifest) -> bool:
    return manifest.provenance.get("kind") in ("builtin", "random")


def _record(pipe: Any, prompts: Sequence[str], steps: int, on_step: Callable[[str], None],
            keep: Callable[[str], bool]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Generate ``prompts`` with ``pipe`` (``steps`` steps each) and keep every call's feeds per component."""
    calls: dict[str, list[dict[str, np.ndarray]]] = {}

    def recorder(component: str, feeds: Mapping[str, np.ndarray]) -> None:
        if keep(component):
            calls.setdefault(component, []).append({k: np.array(v, copy=True) for k, v in feeds.items()})

    scheduler = "flow-euler" if pipe.config.is_flow else "euler"
    pipe.recorder = recorder
    try:
        for i, prompt in enumerate(prompts):
            on_step(f"recording denoiser inputs: prompt {i + 1}/{len(prompts)}")
            pipe(prompt, negative_prompt=_negative(pipe.layout), num_inference_steps=steps,
                 guidance_scale=_guidance(pipe.layout), seed=i, scheduler=scheduler, output_type="latent")
    finally:
        pipe.recorder = None
    return calls


def _subsample(items: list[Any], limit: int) -> list[Any]:
    """At most ``limit`` items spread evenly over the list (over every step of every prompt)."""
    if len(items) <= limit:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, limit).round()]


# -- quantizing components ---------------------------------------------------------


def _run_method(backend: str, method: str, role: str, variant: str, job: QuantJob) -> MethodResult:
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


def _component(root: Path, comp: Component, tmp: Path, backend: str, method: str, role: str, variant: str,
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
    result = _run_method(backend, method, role, variant, job)
    files = [str(rel / f) for f in result.files]
    details = {k: v for k, v in result.details.items() if k != "inference_precision_hint"}
    details["method"] = method
    details["recipe"] = result.details.get("method", method)
    made = make_component(tmp, comp.name, str(rel / result.entry), files, comp.inputs, comp.outputs,
                          result.precision, quantization=details)
    return made, details


# -- the gate ----------------------------------------------------------------------


def _image_scores(reference: np.ndarray, images: np.ndarray) -> dict[str, Any]:
    per = [(psnr(r, g), ssim(r, g)) for r, g in zip(reference, images)]
    p = [x for x, _ in per]
    s = [y for _, y in per]
    finite = [x for x in p if math.isfinite(x)]
    return {"psnr_db": min(p), "psnr_db_mean": float(np.mean(finite)) if finite else float("inf"),
            "ssim": min(s), "ssim_mean": float(np.mean(s)), "per_image": [{"psnr_db": a, "ssim": b} for a, b in per]}


def _cosines(parent: Any, quant: Any, feeds: Mapping[str, list[dict[str, np.ndarray]]],
             plan: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, samples in feeds.items():
        if plan.get(name) == "fp32" or name not in quant.components:
            continue
        worst_cos, worst_abs = 1.0, 0.0
        for feed in samples:
            ref = parent.components[name].run(dict(feed))
            got = quant._run(name, feed)
            rep = compare_outputs(ref, got)
            worst_cos = min(worst_cos, *(v for k, v in rep.items() if k.endswith("_cosine")))
            worst_abs = max(worst_abs, *(v for k, v in rep.items() if k.endswith("_max_abs")))
        out[name] = {"min_cosine": worst_cos, "max_abs": worst_abs, "feeds": len(samples)}
    return out


class _Missed(FidelityError):
    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def quantize_pipeline(artifact: str | Path, out_dir: str | Path, method: str, *, backend: str = "onnxruntime",
                      components: Mapping[str, str] | None = None, calibration: str | None = None,
                      calibration_prompts: int = 8, calibration_steps: int | None = None,
                      group_size: int = 128, ratio: float = 1.0,
                      min_psnr: float | None = None, min_ssim: float | None = None,
                      auto_fallback: bool = False, overwrite: bool = False,
                      check_fidelity: bool = True, reference: str = "auto",
                      on_step: Callable[[str], None] = lambda msg: None,
                      gate: GateSpec = GateSpec()) -> Manifest:
    """Quantize the float ONNX pipeline ``artifact`` with ``method`` (fp16, int8, int4) for
    ``backend`` into ``out_dir``, gated on the image.

    ``components`` overrides the method per component (``{"vae_decoder": "fp16"}``);
    ``calibration`` is a prompts file (one per line; default the built-in list), of which
    ``calibration_prompts`` are generated with ``calibration_steps`` steps (default: the
    gate's steps) to record the denoiser's inputs. The result's worst gate image must
    keep ``min_psnr`` dB and ``min_ssim`` against the float parent (defaults in
    :data:`BUDGETS` by the denoiser's method); else :class:`FidelityError` names the
    numbers and nothing is written. ``reference``: "auto" (float parent, and diffusers
    when the weights can be rebuilt from provenance), "parent" or "diffusers".
    """
    root = Path(artifact)
    parent = read_manifest(root)
    verify_artifact(root, parent)
    expect_stage(parent.task, "quantize", "enginekit.quant.api:quantize_text_to_image")
    if parent.kind != "onnx" or parent.quantization:
        raise QuantizationError(f"{root}: quantize takes a float ONNX pipeline (from export), this one is "
                                f"{parent.kind}{' ' + str(parent.quantization.get('method')) if parent.quantization else ''}")
    if backend not in ("onnxruntime", "openvino"):
        raise QuantizationError(f"pipelines quantize for onnxruntime or openvino, not {backend!r}")
    if reference not in ("auto", "parent", "diffusers"):
        raise InputError(f"reference must be 'auto', 'parent' or 'diffusers', got {reference!r}")
    if reference == "diffusers" and not _rebuildable(parent):
        raise InputError(f"{root}: diffusers can rebuild only seeded built-ins and --random-weights exports; "
                         "use reference='parent'")
    plan, notes = _plan(parent, method, components)
    from enginekit.runtimes.tasks.text_to_image import PipelineConfig

    cfg = PipelineConfig.from_section(parent.task_config)
    denoiser = cfg.denoiser
    if auto_fallback and plan[denoiser] != "int8":
        raise QuantizationError(f"--auto-fallback keeps int8 layers of the denoiser in float; the {denoiser} is "
                                f"{plan[denoiser]} here")
    if calibration_prompts < 1:
        raise InputError(f"calibration_prompts must be at least 1, got {calibration_prompts}")
    psnr_budget = BUDGETS.get(plan[denoiser], BUDGETS["fp16"])[0] if min_psnr is None else float(min_psnr)
    ssim_budget = BUDGETS.get(plan[denoiser], BUDGETS["fp16"])[1] if min_ssim is None else float(min_ssim)
    options = QuantOptions(group_size=group_size, ratio=ratio)
    steps = calibration_steps or gate.steps

    calib: list[dict[str, np.ndarray]] | None = None
    calib_record: dict[str, Any] | None = None
    prompts, prompt_record = read_prompts(calibration)
    needs_calib = plan[denoiser] == "int8"
    float_pipe = _open(root, parent, "onnxruntime")
    try:
        if needs_calib:
            chosen = prompts[:calibration_prompts]
            calls = _record(float_pipe, chosen, steps, on_step, keep=lambda c: c == denoiser)
            recorded = calls.get(denoiser, [])
            calib = _subsample(recorded, MAX_CALIBRATION_FEEDS)
            calib_record = {**prompt_record, "prompts_used": len(chosen), "steps": steps,
                            "denoiser_calls": len(recorded), "samples": len(calib),
                            "batch": int(next(iter(calib[0].values())).shape[0]) if calib else 0}
        ref_images = diff_images = None
        gate_feeds: dict[str, list[dict[str, np.ndarray]]] = {}
        if check_fidelity:
            on_step("generating the gate images with the float parent")
            rec: dict[str, list[dict[str, np.ndarray]]] = {}

            def recorder(component: str, feeds: Mapping[str, np.ndarray]) -> None:
                rec.setdefault(component, []).append({k: np.array(v, copy=True) for k, v in feeds.items()})

            float_pipe.recorder = recorder
            try:
                ref_images = _generate(float_pipe, gate)
            finally:
                float_pipe.recorder = None
            gate_feeds = {k: _subsample(v, COSINE_FEEDS) for k, v in rec.items()}
            if reference == "diffusers" or (reference == "auto" and _rebuildable(parent)):
                on_step("generating the gate images with diffusers (PyTorch)")
                diff_images = _diffusers_images(parent, float_pipe, gate)
        gate_size = gate.size or cfg.default_size

        def attempt(variant: str, opts: QuantOptions, fallback: list[dict[str, Any]] | None) -> Manifest:
            # The float engines are not needed while quantizing (NNCF holds its own copies of the
            # denoiser): free them; the cosines below load what they use again, on demand.
            float_pipe.close()
            with atomic_artifact(out_dir, overwrite=overwrite, inputs=(root,)) as tmp:
                comps: dict[str, Component] = {}
                details: dict[str, Any] = {}
                for name, comp in parent.components.items():
                    role = "denoiser" if name == denoiser else "component"
                    on_step(f"{name}: {plan[name]} ({backend})")
                    made, det = _component(root, comp, tmp, backend, plan[name], role, variant, calib,
                                           opts if role == "denoiser" else replace(opts, exclude_nodes=()))
                    if name in notes:
                        det["note"] = notes[name]
                    comps[name], details[name] = made, det
                copy_assets(root, tmp, parent)
                manifest = _manifest(root, parent, backend, method, plan, comps, details, calib_record, variant,
                                     opts, fallback)
                write_manifest(tmp, manifest)
                if not check_fidelity:
                    return manifest
                on_step("generating the gate images with the quantized pipeline")
                quant = _open(tmp, manifest, backend)
                try:
                    images = _generate(quant, gate)
                    cos = _cosines(float_pipe, quant, gate_feeds, plan)
                finally:
                    quant.close()
                vs_parent = _image_scores(ref_images, images)
                report: dict[str, Any] = {
                    "reference": "float parent", "judged_on": {
                        "prompts": list(gate.prompts), "seeds": list(gate.seeds), "steps": gate.steps,
                        "height": gate_size, "width": gate_size, "negative_prompt": _negative(float_pipe.layout),
                        "scheduler": "flow-euler" if cfg.is_flow else "euler",
                        "latents": "numpy default_rng(seed), diffusers' layout", "images": len(images)},
                    "vs_parent": vs_parent, "components": cos,
                    "budget": {"min_psnr_db": psnr_budget, "min_ssim": ssim_budget, "on": "worst image vs float parent"},
                }
                if diff_images is not None:
                    report["vs_diffusers"] = _image_scores(diff_images, images)
                    report["parent_vs_diffusers"] = _image_scores(diff_images, ref_images)
                manifest = manifest.replace(fidelity=report)
                write_manifest(tmp, manifest)
                missed = []
                if vs_parent["psnr_db"] < psnr_budget:
                    missed.append(f"PSNR {vs_parent['psnr_db']:.2f} dB < {psnr_budget} dB")
                if vs_parent["ssim"] < ssim_budget:
                    missed.append(f"SSIM {vs_parent['ssim']:.4f} < {ssim_budget}")
                if missed:
                    raise _Missed(
                        f"{method} pipeline ({backend}{', ' + variant if variant else ''}) misses its image budget "
                        f"vs the float parent on {len(images)} images ({len(gate.prompts)} prompts x "
                        f"{len(gate.seeds)} seeds, {gate.steps} steps, {gate_size}px): {'; '.join(missed)} "
                        f"(mean PSNR {vs_parent['psnr_db_mean']:.2f} dB); nothing was written", report)
            return manifest

        ort_int8 = backend == "onnxruntime" and plan[denoiser] == "int8"
        variants = (["static", "weight-only"] if check_fidelity else ["weight-only"]) if ort_int8 else [""]
        tried: list[dict[str, Any]] = []
        last: _Missed | None = None
        for variant in variants:
            try:
                return attempt(variant, options, tried or None)
            except _Missed as miss:
                tried.append({"variant": variant or plan[denoiser], "psnr_db": miss.report["vs_parent"]["psnr_db"],
                              "ssim": miss.report["vs_parent"]["ssim"]})
                last = miss
                on_step(str(miss))
        assert last is not None
        if not auto_fallback:
            raise FidelityError(str(last) + (f" (tried: {', '.join(t['variant'] for t in tried)})"
                                             if len(tried) > 1 else "")) from None
        return _fallback(root, parent, backend, denoiser, calib, options, attempt, tried, on_step)
    finally:
        float_pipe.close()


def _fallback(root: Path, parent: Manifest, backend: str, denoiser: str, calib: list[dict[str, np.ndarray]] | None,
              options: QuantOptions, attempt: Callable[..., Manifest], tried: list[dict[str, Any]],
              on_step: Callable[[str], None]) -> Manifest:
    """Keep the denoiser's most sensitive quantized layers in float, a tenth at a time, until the image holds."""
    assert calib is not None
    on_step("ranking the denoiser's layers by the error quantizing them causes")
    comp = parent.component(denoiser)
    probe = _subsample(calib, 8)
    with tempfile.TemporaryDirectory(prefix="enginekit-sensitivity-") as scratch:
        job = QuantJob(root / comp.entry, Path(scratch), comp.inputs[0].name, calib, options)
        if backend == "onnxruntime":
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
            return attempt(variant, replace(options, exclude_nodes=tuple(excluded)), steps)
        except _Missed as miss:
            steps.append({"variant": variant or "hybrid", "excluded": len(excluded),
                          "psnr_db": miss.report["vs_parent"]["psnr_db"], "ssim": miss.report["vs_parent"]["ssim"]})
    best = max(s["psnr_db"] for s in steps)
    raise FidelityError(f"the int8 pipeline misses its image budget even with all {len(ranking)} quantized "
                        f"{denoiser} layers kept in float (best PSNR {best:.2f} dB); nothing was written")


def _manifest(root: Path, parent: Manifest, backend: str, method: str, plan: Mapping[str, str],
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
