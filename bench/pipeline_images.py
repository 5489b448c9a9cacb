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
The denoiser's calls are timed on the same steps as the step (the first step's call
is left out of both), so each step holds its own call and the step's median can never
fall below the call's unless a timing is broken. Given a :class:`TimingRule`, the
jobs are repeated (for time only) until the step median is known well enough.
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

__all__ = ["ImageJob", "Generation", "TimingRule", "generation_plan", "engine_images", "diffusers_images",
           "judge_images", "median_interval", "median_spread", "timing_problem"]

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


@dataclass(frozen=True)
class TimingRule:
    """When a side's step time is known well enough to rank candidates on a busy machine.

    After the judged images, the jobs are generated again (for time only) until there
    are at least ``min_samples`` step samples and the distribution-free 95% confidence
    interval of their median (:func:`median_spread`) lies within ``max_spread`` of the
    median (0.05: +-5%), or until ``budget_s`` seconds of timing have passed.
    """

    min_samples: int = 12
    max_spread: float = 0.05
    budget_s: float = 20.0

    def __post_init__(self) -> None:
        if self.min_samples < 1 or not self.max_spread > 0 or not self.budget_s >= 0:
            raise ValueError(f"TimingRule needs min_samples >= 1, max_spread > 0 and budget_s >= 0; got {self}")

    def met(self, samples: Sequence[float]) -> bool:
        return len(samples) >= self.min_samples and median_spread(samples) <= self.max_spread

    def describe(self) -> str:
        return (f"at least {self.min_samples} step samples and until the 95% confidence interval of the median is "
                f"within +-{self.max_spread:.0%} of it, at most {self.budget_s:g} s of timing per side")


def median_interval(samples: Sequence[float]) -> list[float] | None:
    """The distribution-free 95% confidence interval of the median: the order statistics at
    n/2 -+ 0.98 sqrt(n) (the whole range for small n); None under 3 samples."""
    x = sorted(samples)
    n = len(x)
    if n < 3:
        return None
    half = 0.98 * n ** 0.5
    lo, hi = max(int(np.floor(n / 2 - half)), 0), min(int(np.ceil(n / 2 + half)), n - 1)
    return [float(x[lo]), float(x[hi])]


def median_spread(samples: Sequence[float]) -> float:
    """Half the width of :func:`median_interval`, relative to the median; inf when unknown."""
    ci = median_interval(samples)
    med = float(np.median(samples)) if len(samples) else 0.0
    return (ci[1] - ci[0]) / (2 * med) if ci is not None and med > 0 else float("inf")


@dataclass
class Generation:
    """Images and timings of one side. ``component_ms`` holds each component's timed calls
    (the denoiser's: only those inside timed steps), ``denoiser_step_ms`` the denoiser's time
    within each timed step (paired with ``step_ms``), ``calls`` every call's count."""

    images: list[np.ndarray] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    image_ms: list[float] = field(default_factory=list)
    component_ms: dict[str, list[float]] = field(default_factory=dict)
    denoiser: str | None = None
    denoiser_step_ms: list[float] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    timing_images: int = 0  # images generated for time only, after the judged ones
    timing_s: float = 0.0
    rule: TimingRule | None = None
    #: Steps per step sample: 1, or a step cache's interval N (each sample is then the mean of N
    #: consecutive steps, one full and N-1 cached: what a step costs on average).
    cycle: int = 1
    #: Step ends before the first whole cycle (TaylorSeer's warm-up steps all run in full): the
    #: samples start at the end of step ``start - 1``. 1 for DeepCache and no cache.
    start: int = 1

    def summary(self) -> dict[str, Any]:
        med = lambda v: float(np.median(v)) if v else None  # noqa: E731
        images = max(len(self.image_ms), 1)
        out: dict[str, Any] = {
            "step_ms": med(self.step_ms), "image_ms": med(self.image_ms),
            "step_samples": len(self.step_ms), "image_samples": len(self.image_ms),
            "step_spread": median_spread(self.step_ms) if self.step_ms else None,
            "step_ci_ms": median_interval(self.step_ms),
            "components_ms": {k: med(v) for k, v in self.component_ms.items()},
            "component_samples": {k: len(v) for k, v in self.component_ms.items()},
            "calls_per_image": {k: n / images for k, n in (self.calls or {
                k: len(v) for k, v in self.component_ms.items()}).items()},
            "denoiser": self.denoiser, "denoiser_step_ms": med(self.denoiser_step_ms),
            "timing_images": self.timing_images, "timing_s": self.timing_s, "cycle": self.cycle,
        }
        if self.rule is not None:
            out["rule"] = {"min_samples": self.rule.min_samples, "max_spread": self.rule.max_spread,
                           "budget_s": self.rule.budget_s, "met": self.rule.met(self.step_ms)}
        return out


def timing_problem(summary: dict[str, Any]) -> str | None:
    """Why a side's timing cannot be right, or None: a step holds the denoiser's call, so a
    median step below the denoiser's median call (or its median time per step) is impossible."""
    step, denoiser = summary.get("step_ms"), summary.get("denoiser")
    if step is None or denoiser is None:
        return None
    call = (summary.get("components_ms") or {}).get(denoiser)
    per_step = summary.get("denoiser_step_ms")
    if (summary.get("cycle") or 1) > 1:  # a cached step runs less than the full call: a cycle holds its calls
        call = None
    worst = max((v for v in (call, per_step) if v is not None), default=None)
    if worst is not None and step < worst:
        return (f"step {step:.2f} ms is below the {denoiser}'s own call ({worst:.2f} ms), which every step "
                f"contains: an impossible timing")
    return None


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


Calls = dict[str, list[tuple[float, float]]]  # component -> (start, end) per call, perf_counter seconds


def _generate_all(call: Callable[[ImageJob, int, list[float]], np.ndarray], jobs: Sequence[ImageJob],
                  plan: GenerationPlan, gen: Generation, calls: Calls, warmup: bool,
                  rule: TimingRule | None = None) -> None:
    """Every job through ``call(job, steps, marks)`` (which appends a time per step end to
    ``marks``), after an optional one-step warm-up whose component calls are not counted:
    images, per-image times and step times (between consecutive step ends) land in ``gen``,
    each step paired with the denoiser's time inside it. With ``rule``, the jobs then run
    again for time only (their images dropped) until the rule is met or its budget spent."""
    if warmup:  # a DeepCache pipeline's second step opens its cut engine
        call(jobs[0], 2 if gen.cycle > 1 else 1, [])
    calls.clear()
    den = gen.denoiser
    start_timing = time.perf_counter()

    def one(job: ImageJob, keep: bool) -> None:
        marks: list[float] = []
        seen = {k: len(v) for k, v in calls.items()}
        start = time.perf_counter()
        image = np.asarray(call(job, plan.steps, marks), dtype=np.float32)
        gen.image_ms.append((time.perf_counter() - start) * 1e3)
        if keep:
            gen.images.append(image)
        for comp, events in calls.items():
            new = events[seen.get(comp, 0):]
            gen.calls[comp] = gen.calls.get(comp, 0) + len(new)
            if comp != den:
                gen.component_ms.setdefault(comp, []).extend((e - s) * 1e3 for s, e in new)
        # Step samples: the time between step ends, summed over each cycle of a step cache (complete
        # cycles only) and divided by its steps; the denoiser's time in them (its cut engine's too).
        n = gen.cycle
        ends = marks[gen.start - 1::n] if n > 1 else marks
        for a, b in zip(ends, ends[1:]):
            gen.step_ms.append((b - a) * 1e3 / n)
            if den is not None:
                inside = [(s, e) for s, e in calls.get(den, [])[seen.get(den, 0):] if s >= a and e <= b]
                gen.component_ms.setdefault(den, []).extend((e - s) * 1e3 for s, e in inside)
                cut = [(s, e) for k, v in calls.items() if k.startswith(den + "#")
                       for s, e in v[seen.get(k, 0):] if s >= a and e <= b]
                gen.denoiser_step_ms.append(sum(e - s for s, e in inside + cut) * 1e3 / n)

    for job in jobs:
        one(job, keep=True)
    if rule is not None:
        gen.rule = rule
        i = 0
        while not rule.met(gen.step_ms) and time.perf_counter() - start_timing < rule.budget_s:
            one(jobs[i % len(jobs)], keep=False)
            gen.timing_images += 1
            i += 1
    gen.timing_s = time.perf_counter() - start_timing


def engine_images(path: Path, backend: str, jobs: Sequence[ImageJob], plan: GenerationPlan,
                  threads: int = 0, rule: TimingRule | None = None, cache: str | None = None) -> tuple[Generation, int]:
    """Generate every job with the engine at ``path`` (threads pinned as the pipeline bench
    pins them; ``cache`` the pipeline's step cache, "none" by default), then repeat them for
    time only as ``rule`` asks; returns the generation and the thread count in effect."""
    from enginekit.bench.pipeline import _open_pipeline
    from enginekit.runtimes.tasks.step_cache import cache_interval, cache_name, cache_offset

    cache = cache_name(cache)
    pipe, _, _, threads = _open_pipeline(Path(path), "cpu", backend, threads)
    gen = Generation(denoiser=pipe.config.denoiser, cycle=cache_interval(cache), start=max(cache_offset(cache), 1))
    calls: Calls = {}
    run = pipe.run_component

    def timed_run(component: str, feeds: Any, runner: Any = None) -> Any:
        start = time.perf_counter()
        try:
            return run(component, feeds, runner=runner)
        finally:  # a cut engine's calls under its own name ("unet#deepcache")
            name = component if runner is None else (getattr(runner, "component", "") or component)
            calls.setdefault(name, []).append((start, time.perf_counter()))

    # Every engine call goes through run_component (the layouts' too): an instance attribute
    # times this pipeline object's calls only.
    pipe.run_component = timed_run
    try:
        def call(job: ImageJob, steps: int, marks: list[float]) -> np.ndarray:
            return pipe(job.prompt, negative_prompt=plan.negative, num_inference_steps=steps,
                        guidance_scale=plan.guidance, height=plan.size, width=plan.size,
                        latents=plan.latents(job.seed), scheduler=plan.scheduler, output_type="np", cache=cache,
                        callback=lambda i, t, x: marks.append(time.perf_counter()) and None).images

        _generate_all(call, jobs, plan, gen, calls, warmup=True, rule=rule)  # the warm-up loads each component
    finally:
        pipe.close()
    return gen, threads


def _diffusers_scheduler(dpipe: Any, plan: GenerationPlan) -> None:
    import diffusers

    cls = diffusers.FlowMatchEulerDiscreteScheduler if plan.scheduler == "flow-euler" else \
        diffusers.EulerDiscreteScheduler
    dpipe.scheduler = cls.from_config(dpipe.scheduler.config)
    dpipe.set_progress_bar_config(disable=True)


def diffusers_images(dpipe: Any, jobs: Sequence[ImageJob], plan: GenerationPlan, threads: int,
                     warmup: bool = True, rule: TimingRule | None = None) -> Generation:
    """The same jobs on diffusers' pipeline, fp32 eager under ``torch.inference_mode()``
    (repeated for time only as ``rule`` asks)."""
    import torch

    _diffusers_scheduler(dpipe, plan)
    modules = {name: getattr(dpipe, name, None) for name in
               ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer")}
    gen = Generation(denoiser=next((n for n in ("unet", "transformer") if modules[n] is not None), None))
    calls: Calls = {}
    handles = []
    for name, module in modules.items():
        if module is None:
            continue
        starts: list[float] = []
        handles.append(module.register_forward_pre_hook(lambda m, a, s=starts: s.append(time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, s=starts, n=name: calls.setdefault(n, []).append((s.pop(), time.perf_counter()))))
    vae = dpipe.vae
    decode = vae.decode

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return decode(*args, **kwargs)
        finally:
            calls.setdefault("vae_decoder", []).append((start, time.perf_counter()))

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

            _generate_all(call, jobs, plan, gen, calls, warmup=warmup, rule=rule)
    finally:
        torch.set_num_threads(previous)
        for h in handles:
            h.remove()
        del vae.decode  # back to the class's method
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
