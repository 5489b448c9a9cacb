"""Pipeline ``optimize``'s plan: the assemblies it tries and the config that judges them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from enginekit.bench.pipeline_images import TimingRule
from enginekit.errors import InputError

__all__ = ["PRECISIONS", "HELD_OUT_PROMPTS", "QUANTIZE_MISSING", "REMEASURES", "PipelineCandidate",
           "PipelineOptimizeConfig", "plan_pipeline_candidates", "cache_steps", "cached_candidates"]

PRECISIONS = ("fp32", "fp16", "int8", "int4")
#: Held-out prompts (never calibration prompts: those quantizers draw are left out, below).
HELD_OUT_PROMPTS = (
    "a red fox sitting in fresh snow, morning light, detailed photograph",
    "an old wooden sailboat on a calm lake at sunset, watercolor",
    "a bowl of ramen on a dark table, studio lighting, close-up",
    "a futuristic city skyline at night with neon signs, digital art",
)
QUANTIZE_MISSING = "quantize for pipelines not available"
#: How many times an impossible timing (a step faster than the denoiser's call in it) is measured again.
REMEASURES = 2


@dataclass(frozen=True)
class PipelineCandidate:
    """One assembly to try: a backend, each component's precision, and how to build it."""

    name: str
    backend: str
    #: component -> fp32 | fp16 | int8 | int4 ("*" for every component not named).
    precisions: Mapping[str, str]
    #: "compile": float engines through ``compile``; "quantize": through quantize_pipeline.
    how: str = "compile"
    #: The quantize_pipeline method (the denoiser's, for a mixed assembly).
    method: str | None = None
    #: ``compile`` options (backend option -> value) and typed flags.
    compile_precision: str = "fp32"
    compile_options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    #: Tests and experiments: builds the engine itself, ``builder(onnx_dir, dest) -> path``.
    builder: Callable[[Path, Path], Path] | None = field(default=None, compare=False)
    #: The pipeline's step cache ("deepcache:3"), run on the engine of candidate ``base`` (not rebuilt).
    cache: str | None = None
    base: str | None = None

    @property
    def family(self) -> str:
        """The lowest precision in the assembly (what ``--precisions`` selects on)."""
        order = {p: i for i, p in enumerate(PRECISIONS)}
        return max(self.precisions.values(), key=lambda p: order.get(p, 0))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["builder"] = None if self.builder is None else getattr(self.builder, "__name__", "custom")
        d["family"] = self.family
        return d


#: The step caches ``optimize`` tries when none are named: DeepCache on a UNet that gives out its
#: deep features, TaylorSeer on any other denoiser (a transformer, a streamed UNet).
DEFAULT_CACHES = {"deepcache": ("deepcache:2", "deepcache:3"), "taylorseer": ("taylorseer:2", "taylorseer:3")}


@dataclass(frozen=True)
class PipelineOptimizeConfig:
    """What pipeline ``optimize`` tries and how it judges."""

    backends: tuple[str, ...] | None = None
    precisions: tuple[str, ...] = PRECISIONS
    min_psnr: float = 30.0
    min_ssim: float | None = None
    size: int | None = None
    steps: int = 4
    guidance: float = 7.5
    prompts: tuple[str, ...] = HELD_OUT_PROMPTS[:2]
    seeds: tuple[int, ...] = (0,)
    threads: int = 0
    calibration_prompts: int = 8
    group_size: int = 128
    #: SD3/SD3.5: export and judge the pipeline without its T5 encoder (as diffusers allows).
    without_t5: bool = False
    #: Export streamed (one block's weights in memory at a time): full-size SDXL, SD3.5, FLUX.
    streaming: bool = False
    #: How long each side's step is timed (samples, spread of the median, time bound).
    timing: TimingRule = TimingRule()
    #: Step caches tried on the fastest candidate within the budget (() for none; None: the
    #: denoiser's own, :data:`DEFAULT_CACHES`).
    caches: tuple[str, ...] | None = None

    def check(self) -> None:
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise InputError(f"precisions must be among {', '.join(PRECISIONS)}; got "
                             f"{', '.join(self.precisions) or 'none'}")
        if not self.prompts:
            raise InputError("no held-out prompts: give at least one (--prompts FILE, one prompt a line)")
        if not self.seeds:
            raise InputError("no seeds: give at least one (--seeds 0,1)")
        if self.min_psnr < 0:
            raise InputError(f"--min-psnr must be at least 0 dB, got {self.min_psnr}")
        if self.steps < 2 or self.steps > 200:
            raise InputError(f"--steps must be 2-200 (a step is timed between two step ends), got {self.steps}")
        if self.guidance <= 1.0:
            raise InputError(f"guidance must be above 1 (the step is timed with CFG), got {self.guidance}")
        from enginekit.runtimes.tasks.step_cache import cache_name

        for cache in self.caches or ():
            cache_name(cache)  # an unknown or malformed cache is refused before any work


def cache_steps(steps: int, cache: str) -> int:
    """The steps a cached candidate is judged and timed at: the fewest at or above ``steps`` that
    end on whole cache cycles after the steps before them (the first step for DeepCache,
    ``k * N + 1``; TaylorSeer's ``before`` warm-up steps, ``before + k * N``, k >= 1), so a cycle's
    average, not a lucky run of cached steps, is what the step time measures."""
    from enginekit.runtimes.tasks.step_cache import cache_interval, cache_offset

    n = cache_interval(cache)
    if n <= 1:
        return steps
    start = max(cache_offset(cache), 1)
    return start + max(-(-(steps - start) // n), 1) * n


def cached_candidates(base: PipelineCandidate, caches: Sequence[str], steps: int) -> list[PipelineCandidate]:
    """``base``'s engine run with each step cache of ``caches`` (canonical names, deduplicated)."""
    from dataclasses import replace

    from enginekit.runtimes.tasks.step_cache import cache_name

    names = dict.fromkeys(cache_name(c) for c in caches)
    return [replace(base, name=f"{base.name}+{c}", cache=c, base=base.name,
                    description=f"{base.name}'s engine with step cache {c} (judged at {cache_steps(steps, c)} steps)")
            for c in names if c != "none"]


def plan_pipeline_candidates(backends: Sequence[str], precisions: Sequence[str], components: Sequence[str],
                             denoiser: str, *, size: int, cpu_flags: Sequence[str] = ()) -> list[PipelineCandidate]:
    """Every assembly for ``backends`` × ``precisions``: all fp32, all fp16, and the denoiser at
    each lower precision with every other component fp32. OpenVINO engines get static shapes
    at ``size`` (batch 1, the denoiser at 2 rows for CFG)."""
    rest = [c for c in components if c != denoiser]
    f32_rest = {c: "f32" for c in rest}
    half = "bf16 compute (AMX/AVX512-BF16)" if {"amx_bf16", "avx512_bf16"} & set(cpu_flags) else \
        "the CPU's own compute precision"
    out: list[PipelineCandidate] = []
    for be in backends:
        ov = be == "openvino"
        out.append(PipelineCandidate(f"{be}-fp32", be, {"*": "fp32"}, compile_options={"inference_precision": "f32"}
                                     if ov else {}, description="every component fp32"))
        if "fp16" in precisions:
            if ov:
                out.append(PipelineCandidate(f"{be}-fp16", be, {"*": "fp16"}, compile_precision="fp16",
                                             description=f"fp16 weights everywhere (the family's fp32 exceptions "
                                                         f"kept), {half}"))
                out.append(PipelineCandidate(
                    f"{be}-fp16-{denoiser}", be, {denoiser: "fp16", "*": "fp32"}, compile_precision="fp16",
                    compile_options={"keep_fp32": rest, "component_inference_precision": f32_rest},
                    description=f"{denoiser} fp16 weights with {half}; the rest fp32, computed in f32"))
            else:
                out.append(PipelineCandidate(f"{be}-fp16", be, {"*": "fp16"}, how="quantize", method="fp16",
                                             description="fp16 graphs (quantize_pipeline)"))
                out.append(PipelineCandidate(f"{be}-fp16-{denoiser}", be, {denoiser: "fp16", "*": "fp32"},
                                             how="quantize", method="fp16",
                                             description=f"{denoiser} fp16 (quantize_pipeline), the rest fp32"))
        for p in ("int8", "int4"):
            if p in precisions:
                out.append(PipelineCandidate(
                    f"{be}-{p}-{denoiser}", be, {denoiser: p, "*": "fp32"}, how="quantize", method=p,
                    compile_options={"inference_precision": "f32"} if ov else {},
                    description=f"{denoiser} {p} (quantize_pipeline), the rest fp32"))
    return [c for c in out if c.family in precisions]
