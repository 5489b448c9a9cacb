"""The image gate of a quantized pipeline: running the float parent, the quantized
pipeline and diffusers on the same prompts, seeds and latents, recording the
denoiser's real inputs, and scoring images (PSNR, SSIM) and components (cosine)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from enginekit.errors import FidelityError
from enginekit.fidelity import compare_outputs, psnr, ssim
from enginekit.manifest import Manifest

NEGATIVE = "blurry, low quality"
#: Feeds per component on which per-component cosine is measured.
COSINE_FEEDS = 4


@dataclass(frozen=True)
class GateSpec:
    """What the image gate generates: every prompt with every seed."""

    prompts: tuple[str, ...] = ("a lighthouse on a cliff at dusk, oil painting",
                                "a red fox sleeping in fresh snow, wildlife photograph")
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 4
    #: Square side in pixels; None: the model's default size.
    size: int | None = None



class Missed(FidelityError):
    """An attempt that missed its image budget; ``report`` is its gate report."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def open_pipeline(root: Path, manifest: Manifest, backend: str) -> Any:
    from enginekit.api import Components
    from enginekit.registry import get_backend
    from enginekit.runtimes.tasks.text_to_image import TextToImage

    return TextToImage(Components(root, manifest, get_backend(backend), "cpu"), manifest, root)


def gate_call(pipe: Any, gate: GateSpec) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """Call arguments and (prompt, latents) per gate image: seeded latents in diffusers' layout."""
    cfg = pipe.config
    size = gate.size or cfg.default_size
    layout = pipe.layout
    call = {"num_inference_steps": gate.steps, "guidance_scale": guidance(layout), "height": size,
            "width": size, "negative_prompt": negative_prompt(layout)}
    jobs = []
    for prompt in gate.prompts:
        for seed in gate.seeds:
            lat = np.random.default_rng(seed).standard_normal(layout.unpacked_shape(1, size, size), dtype=np.float32)
            jobs.append((prompt, layout.pack(lat)))
    return call, jobs


def generate(pipe: Any, gate: GateSpec) -> np.ndarray:
    call, jobs = gate_call(pipe, gate)
    scheduler = "flow-euler" if pipe.config.is_flow else "euler"
    return np.concatenate([pipe(p, latents=lat, scheduler=scheduler, output_type="np", **call).images
                           for p, lat in jobs])


def diffusers_images(manifest: Manifest, pipe: Any, gate: GateSpec) -> np.ndarray:
    """The same prompts, latents, scheduler and steps through diffusers' PyTorch pipeline."""
    import diffusers
    import torch

    from enginekit.export.diffusion.reference import reference_pipeline

    dpipe = reference_pipeline(manifest)
    cls = diffusers.FlowMatchEulerDiscreteScheduler if pipe.config.is_flow else diffusers.EulerDiscreteScheduler
    dpipe.scheduler = cls.from_config(dpipe.scheduler.config)
    dpipe.set_progress_bar_config(disable=True)
    call, jobs = gate_call(pipe, gate)
    with torch.inference_mode():
        return np.concatenate([dpipe(p, latents=torch.from_numpy(lat), output_type="np", **call).images
                               for p, lat in jobs])


def negative_prompt(layout: Any) -> str | None:
    """The negative prompt calibration and the gate use: none for a guidance-distilled model."""
    return NEGATIVE if layout.takes_negative_prompt else None


def guidance(layout: Any) -> float:
    """CFG 7.5, or the layout's own reference guidance (FLUX's distilled 3.5)."""
    return layout.reference_guidance if layout.reference_guidance is not None else 7.5


def rebuildable(manifest: Manifest) -> bool:
    return manifest.provenance.get("kind") in ("builtin", "random")


def record(pipe: Any, prompts: Sequence[str], steps: int, on_step: Callable[[str], None],
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
            pipe(prompt, negative_prompt=negative_prompt(pipe.layout), num_inference_steps=steps,
                 guidance_scale=guidance(pipe.layout), seed=i, scheduler=scheduler, output_type="latent")
    finally:
        pipe.recorder = None
    return calls


def subsample(items: list[Any], limit: int) -> list[Any]:
    """At most ``limit`` items spread evenly over the list (over every step of every prompt)."""
    if len(items) <= limit:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, limit).round()]


def image_scores(reference: np.ndarray, images: np.ndarray) -> dict[str, Any]:
    per = [(psnr(r, g), ssim(r, g)) for r, g in zip(reference, images)]
    p = [x for x, _ in per]
    s = [y for _, y in per]
    finite = [x for x in p if math.isfinite(x)]
    return {"psnr_db": min(p), "psnr_db_mean": float(np.mean(finite)) if finite else float("inf"),
            "ssim": min(s), "ssim_mean": float(np.mean(s)), "per_image": [{"psnr_db": a, "ssim": b} for a, b in per]}


def cosines(parent: Any, quant: Any, feeds: Mapping[str, list[dict[str, np.ndarray]]],
             plan: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, samples in feeds.items():
        if plan.get(name) == "fp32" or name not in quant.components:
            continue
        worst_cos, worst_abs = 1.0, 0.0
        for feed in samples:
            ref = parent.components[name].run(dict(feed))
            got = quant.run_component(name, feed)
            rep = compare_outputs(ref, got)
            worst_cos = min(worst_cos, *(v for k, v in rep.items() if k.endswith("_cosine")))
            worst_abs = max(worst_abs, *(v for k, v in rep.items() if k.endswith("_max_abs")))
        out[name] = {"min_cosine": worst_cos, "max_abs": worst_abs, "feeds": len(samples)}
    return out


@dataclass(frozen=True)
class GateReference:
    """What a quantized pipeline is judged against: the float parent's gate images, diffusers'
    (when rebuilt), and the feeds each component saw while the parent made them."""

    images: np.ndarray
    diffusers: np.ndarray | None
    feeds: Mapping[str, list[dict[str, np.ndarray]]]


def reference_images(parent: Manifest, float_pipe: Any, gate: GateSpec, reference: str,
                     on_step: Callable[[str], None]) -> GateReference:
    """The gate images of the float parent (recording every component's feeds), and diffusers'
    when ``reference`` asks for them."""
    on_step("generating the gate images with the float parent")
    rec: dict[str, list[dict[str, np.ndarray]]] = {}

    def recorder(component: str, feeds: Mapping[str, np.ndarray]) -> None:
        rec.setdefault(component, []).append({k: np.array(v, copy=True) for k, v in feeds.items()})

    float_pipe.recorder = recorder
    try:
        ref_images = generate(float_pipe, gate)
    finally:
        float_pipe.recorder = None
    diff_images = None
    if reference == "diffusers" or (reference == "auto" and rebuildable(parent)):
        on_step("generating the gate images with diffusers (PyTorch)")
        diff_images = diffusers_images(parent, float_pipe, gate)
    return GateReference(ref_images, diff_images, {k: subsample(v, COSINE_FEEDS) for k, v in rec.items()})


def gate_report(float_pipe: Any, quant: Any, ref: GateReference, gate: GateSpec, plan: Mapping[str, str],
                budget: tuple[float, float]) -> dict[str, Any]:
    """The quantized pipeline's gate images and component cosines against ``ref``: the
    manifest's ``fidelity`` section."""
    cfg = float_pipe.config
    size = gate.size or cfg.default_size
    images = generate(quant, gate)
    cos = cosines(float_pipe, quant, ref.feeds, plan)
    report: dict[str, Any] = {
        "reference": "float parent", "judged_on": {
            "prompts": list(gate.prompts), "seeds": list(gate.seeds), "steps": gate.steps,
            "height": size, "width": size, "negative_prompt": negative_prompt(float_pipe.layout),
            "scheduler": "flow-euler" if cfg.is_flow else "euler",
            "latents": "numpy default_rng(seed), diffusers' layout", "images": len(images)},
        "vs_parent": image_scores(ref.images, images), "components": cos,
        "budget": {"min_psnr_db": budget[0], "min_ssim": budget[1], "on": "worst image vs float parent"},
    }
    if ref.diffusers is not None:
        report["vs_diffusers"] = image_scores(ref.diffusers, images)
        report["parent_vs_diffusers"] = image_scores(ref.diffusers, ref.images)
    return report


def check_budget(report: dict[str, Any], gate: GateSpec, what: str) -> None:
    """Raise :class:`Missed` when the worst gate image misses the report's budget; ``what``
    names the attempt."""
    vs_parent, budget = report["vs_parent"], report["budget"]
    missed = []
    if vs_parent["psnr_db"] < budget["min_psnr_db"]:
        missed.append(f"PSNR {vs_parent['psnr_db']:.2f} dB < {budget['min_psnr_db']} dB")
    if vs_parent["ssim"] < budget["min_ssim"]:
        missed.append(f"SSIM {vs_parent['ssim']:.4f} < {budget['min_ssim']}")
    if missed:
        size = report["judged_on"]["height"]
        raise Missed(
            f"{what} misses its image budget "
            f"vs the float parent on {report['judged_on']['images']} images ({len(gate.prompts)} prompts x "
            f"{len(gate.seeds)} seeds, {gate.steps} steps, {size}px): {'; '.join(missed)} "
            f"(mean PSNR {vs_parent['psnr_db_mean']:.2f} dB); nothing was written", report)
