"""Whole images from a pipeline engine and from diffusers on the same latents, timed as they run.

``optimize`` for pipelines judges and times each candidate in one pass: every held-out
(prompt, seed) image is generated once, its PSNR taken against diffusers' image of the
same prompt, latents, scheduler and steps, and the same generation timed:

- ``step``: the time between the ends of consecutive denoising steps (the step callback
  on both sides), so the first step, which pays for any lazy set-up, is never counted.
  It holds the denoiser's call (both CFG passes in one), the guidance and the scheduler
  step: what :mod:`enginekit.bench.pipeline` calls a step;
- ``image``: the whole generation, prompt to pixels;
- ``components``: each component's calls (the engine's runner calls; diffusers' module
  forwards, its VAE ``decode``), median per call.

Each side first runs one untimed one-step image (the warm-up: components load and
compile there), then the timed images; every figure is the median of its repeats.
Works for every family: UNet pipelines with CFG, SD3 (flow matching, CFG) and FLUX
(guidance-distilled: no negative prompt, packed latents).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.fidelity import psnr

__all__ = ["ImageJob", "Generation", "generation_plan", "engine_images", "diffusers_images", "judge_images"]

NEGATIVE = "blurry, low quality"


@dataclass(frozen=True)
class ImageJob:
    prompt: str
    seed: int


@dataclass(frozen=True)
class GenerationPlan:
    """What both sides are called with, whatever the family."""

    size: int
    steps: int
    guidance: float
    negative: str | None
    scheduler: str  # our port's name; diffusers gets the matching class
    latent_shape: tuple[int, ...]
    #: The latents travel packed (FLUX); then diffusers takes no negative prompt either.
    packed: bool

    def latents(self, seed: int) -> np.ndarray:
        from enginekit.runtimes.tasks.layouts import pack_latents

        x = np.random.default_rng(seed).standard_normal(self.latent_shape, dtype=np.float32)
        return pack_latents(x) if self.packed else x


@dataclass
class Generation:
    """Images and timings of one side."""

    images: list[np.ndarray] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    image_ms: list[float] = field(default_factory=list)
    component_ms: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        med = lambda v: float(np.median(v)) if v else None  # noqa: E731
        return {"step_ms": med(self.step_ms), "image_ms": med(self.image_ms),
                "step_samples": len(self.step_ms), "image_samples": len(self.image_ms),
                "components_ms": {k: med(v) for k, v in self.component_ms.items()},
                "calls_per_image": {k: len(v) / max(len(self.image_ms), 1) for k, v in self.component_ms.items()}}


def generation_plan(task_config: Any, size: int, steps: int, guidance: float = 7.5) -> GenerationPlan:
    """The call for a pipeline whose manifest task section is ``task_config``: Euler (flow-matching
    Euler for SD3 and FLUX), CFG ``guidance`` with a negative prompt, FLUX at 3.5 without one."""
    from enginekit.errors import InputError
    from enginekit.runtimes.tasks.layouts import layout_for
    from enginekit.runtimes.tasks.text_to_image import PipelineConfig

    cfg = PipelineConfig.from_section(task_config)
    layout = layout_for(cfg)
    step = layout.size_multiple
    if size < step or size % step:
        raise InputError(f"--size must be a positive multiple of {step} for this pipeline, got {size}")
    if steps < 2:
        raise InputError(f"--steps must be at least 2 (a step is timed between two step ends), got {steps}")
    reference = layout.reference_guidance
    return GenerationPlan(size=size, steps=steps, guidance=guidance if reference is None else reference,
                          negative=NEGATIVE if layout.takes_negative_prompt else None,
                          scheduler="flow-euler" if cfg.is_flow else "euler",
                          latent_shape=layout.unpacked_shape(1, size, size), packed=layout.packs_latents)


def _generate_all(call: Callable[[ImageJob, int, list[float]], np.ndarray], jobs: Sequence[ImageJob],
                  plan: GenerationPlan, gen: Generation, calls: dict[str, list[float]], warmup: bool) -> None:
    """Every job through ``call(job, steps, marks)`` (which appends a time per step end to
    ``marks``), after an optional one-step warm-up whose component calls are not counted:
    images, per-image times and step times (between consecutive step ends) land in ``gen``."""
    if warmup:
        call(jobs[0], 1, [])
    calls.clear()
    for job in jobs:
        marks: list[float] = []
        start = time.perf_counter()
        gen.images.append(np.asarray(call(job, plan.steps, marks), dtype=np.float32))
        gen.image_ms.append((time.perf_counter() - start) * 1e3)
        gen.step_ms += [(b - a) * 1e3 for a, b in zip(marks, marks[1:])]


def engine_images(path: Path, backend: str, jobs: Sequence[ImageJob], plan: GenerationPlan,
                  threads: int = 0) -> tuple[Generation, int]:
    """Generate every job with the engine at ``path`` (threads pinned as the pipeline bench
    pins them); returns the generation and the thread count in effect."""
    from enginekit.bench.pipeline import _open_pipeline

    pipe, _, _, threads = _open_pipeline(Path(path), "cpu", backend, threads)
    gen = Generation()
    calls: dict[str, list[float]] = {}
    run = pipe._run

    def timed_run(component: str, feeds: Any) -> Any:
        start = time.perf_counter()
        try:
            return run(component, feeds)
        finally:
            calls.setdefault(component, []).append((time.perf_counter() - start) * 1e3)

    pipe._run = timed_run  # instance attribute: this pipeline object only
    try:
        def call(job: ImageJob, steps: int, marks: list[float]) -> np.ndarray:
            return pipe(job.prompt, negative_prompt=plan.negative, num_inference_steps=steps,
                        guidance_scale=plan.guidance, height=plan.size, width=plan.size,
                        latents=plan.latents(job.seed), scheduler=plan.scheduler, output_type="np",
                        callback=lambda i, t, x: marks.append(time.perf_counter()) and None).images

        _generate_all(call, jobs, plan, gen, calls, warmup=True)  # the warm-up loads (and compiles) each component
    finally:
        pipe.close()
    gen.component_ms = calls
    return gen, threads


def _diffusers_scheduler(dpipe: Any, plan: GenerationPlan) -> None:
    import diffusers

    cls = diffusers.FlowMatchEulerDiscreteScheduler if plan.scheduler == "flow-euler" else \
        diffusers.EulerDiscreteScheduler
    dpipe.scheduler = cls.from_config(dpipe.scheduler.config)
    dpipe.set_progress_bar_config(disable=True)


def diffusers_images(dpipe: Any, jobs: Sequence[ImageJob], plan: GenerationPlan, threads: int,
                     warmup: bool = True) -> Generation:
    """The same jobs on diffusers' pipeline, fp32 eager under ``torch.inference_mode()``."""
    import torch

    _diffusers_scheduler(dpipe, plan)
    gen = Generation()
    calls: dict[str, list[float]] = {}
    handles = []
    modules = {name: getattr(dpipe, name, None) for name in
               ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer")}
    for name, module in modules.items():
        if module is None:
            continue
        starts: list[float] = []
        handles.append(module.register_forward_pre_hook(lambda m, a, s=starts: s.append(time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, s=starts, n=name: calls.setdefault(n, []).append((time.perf_counter() - s.pop()) * 1e3)))
    vae = dpipe.vae
    decode = vae.decode

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return decode(*args, **kwargs)
        finally:
            calls.setdefault("vae_decoder", []).append((time.perf_counter() - start) * 1e3)

    vae.decode = timed_decode
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            def call(job: ImageJob, steps: int, marks: list[float]) -> np.ndarray:
                def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                    marks.append(time.perf_counter())
                    return kwargs

                extra = {} if plan.negative is None else {"negative_prompt": plan.negative}
                return dpipe(job.prompt, num_inference_steps=steps, guidance_scale=plan.guidance,
                             height=plan.size, width=plan.size, latents=torch.from_numpy(plan.latents(job.seed)),
                             output_type="np", callback_on_step_end=on_step, **extra).images

            _generate_all(call, jobs, plan, gen, calls, warmup=warmup)
    finally:
        torch.set_num_threads(previous)
        for h in handles:
            h.remove()
        del vae.decode  # back to the class's method
    gen.component_ms = calls
    return gen


def judge_images(reference: Sequence[np.ndarray], images: Sequence[np.ndarray],
                 jobs: Sequence[ImageJob]) -> dict[str, Any]:
    """PSNR (and SSIM where :mod:`enginekit.fidelity` has it) of each image against diffusers';
    the budget is judged on the worst image. Non-finite pixels count as -inf dB."""
    from enginekit import fidelity

    ssim = getattr(fidelity, "ssim", None)
    rows = []
    for job, ref, got in zip(jobs, reference, images):
        finite = bool(np.isfinite(got).all())
        row: dict[str, Any] = {"prompt": job.prompt, "seed": job.seed,
                               "psnr_db": psnr(ref, got) if finite else float("-inf")}
        if not finite:
            row["note"] = "non-finite pixels"
        if ssim is not None and finite:
            row["ssim"] = float(ssim(ref, got))
        rows.append(row)
    out: dict[str, Any] = {"reference": "diffusers fp32 eager, same prompt, latents, scheduler and steps",
                           "images": rows, "psnr_db_min": min(r["psnr_db"] for r in rows),
                           "psnr_db_mean": float(np.mean([min(r["psnr_db"], 200.0) for r in rows]))}
    if ssim is not None and all("ssim" in r for r in rows):
        out["ssim_min"] = min(r["ssim"] for r in rows)
    return out
