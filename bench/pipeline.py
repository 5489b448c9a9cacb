"""The pipeline bench: a text-to-image artifact timed part by part, beside diffusers in the same run.

Three kinds of part, one record each (the classifier record's fields, see
:mod:`enginekit.bench.harness`, plus ``part``, ``height``, ``width`` and ``steps``):

- ``component:NAME``: one call of a component on seeded feeds at the size asked for:
  a text encoder on the CFG batch (the negative and the positive prompt), the denoiser
  (the UNet, or SD3's and FLUX's transformer) on 2 × images latents, the VAE decoder on
  the images' latents, the VAE encoder on one image;
- ``step``: one denoising step, both CFG passes in one denoiser call plus the guidance
  and the scheduler step: the headline number. FLUX is guidance-distilled: its step is
  one pass per image, its text encoders see the prompt alone;
- ``image``: a whole image, encode the prompt → ``steps`` denoising steps → decode.

With the PyTorch baseline, diffusers' pipeline of the same weights (rebuilt from the
manifest's provenance; fp32 eager under ``torch.inference_mode()``, with the engine's
thread count) runs the same parts on the same feeds and initial latents, once before
the engine and once after. Each part's baseline record is the faster of the two, so a
shared machine that slowed down meanwhile cannot flatter the engine; both p50s are kept
in its ``baseline_p50_ms``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from enginekit.bench.harness import (
    BenchConfig,
    _progress_bar,
    add_speedups,
    engine_info,
    latency_stats,
    make_record,
    time_callable,
)
from enginekit.errors import InputError, ShapeError
from enginekit.export.diffusion.reference import reference_pipeline
from enginekit.hardware import fingerprint
from enginekit.manifest import Manifest, TensorSpec

__all__ = ["PipelineBenchConfig", "bench_pipeline", "baseline_note", "is_pipeline"]

#: Our scheduler ports -> diffusers' classes (and overrides), so both sides step alike.
DIFFUSERS_SCHEDULERS: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


@dataclass(frozen=True)
class PipelineBenchConfig:
    """What to time on a text-to-image artifact.

    ``height``/``width`` None: the size a static-shape engine was compiled for, else the
    pipeline's default. ``warmup``/``runs``/``duration_s`` apply to each component and to
    the step (as :class:`~enginekit.bench.harness.BenchConfig`); the whole image runs
    ``image_runs`` times with no warm-up (its components are warm by then), 0 to skip it.
    ``threads`` 0: the engine's recorded count, else the machine's physical cores; PyTorch
    gets the same.
    """

    height: int | None = None
    width: int | None = None
    steps: int = 20
    images: int = 1
    warmup: int = 1
    runs: int | None = 5
    duration_s: float | None = None
    image_runs: int = 1
    threads: int = 0
    seed: int = 0
    guidance_scale: float = 7.5
    prompt: str = "a photograph of an astronaut riding a horse"
    scheduler: str | None = None

    def __post_init__(self) -> None:
        self.timing()  # BenchConfig checks runs/duration/warmup/threads
        if self.steps < 1 or self.image_runs < 0 or not 1 <= self.images <= 16:
            raise ValueError(f"PipelineBenchConfig needs steps >= 1, image_runs >= 0 and 1-16 images; got "
                             f"steps={self.steps}, image_runs={self.image_runs}, images={self.images}")
        if not self.guidance_scale > 1.0:
            raise ValueError(f"the step is timed with classifier-free guidance: guidance_scale must be above 1, "
                             f"got {self.guidance_scale}")

    def timing(self) -> BenchConfig:
        return BenchConfig(warmup=self.warmup, runs=self.runs, duration_s=self.duration_s, threads=self.threads,
                           seed=self.seed)


def is_pipeline(path: str | Path) -> bool:
    """Whether the artifact at ``path`` is benched here, as the task registry routes it (reads the manifest only)."""
    from enginekit.manifest import read_manifest
    from enginekit.registry import task_stages

    return task_stages(read_manifest(path).task).bench == "enginekit.bench.stages:bench_pipelines"


# ---------------------------------------------------------------- feeds


@dataclass
class _Plan:
    """The shared, seeded inputs of every part, at the size benched."""

    height: int
    width: int
    scheduler: str
    ids: dict[str, np.ndarray]  # text encoder -> (2, L) int64: [negative, prompt] (FLUX: (1, L), the prompt)
    denoiser: str  # the component: unet or transformer
    unet: dict[str, np.ndarray]  # the denoiser's feeds
    cfg: bool  # both guidance passes in one call (the layout's batched CFG; not FLUX)
    latents: np.ndarray  # (images, C, h/f, w/f); FLUX packed (images, h/16 * w/16, 4C)
    decoder_in: np.ndarray
    encoder_in: np.ndarray
    timestep: float
    mu: float | None  # FLUX dev's resolution-dependent shift (schnell's is fixed)
    layout: Any  # the pipeline's runtime layout


def _size(pipe: Any, config: PipelineBenchConfig) -> tuple[int, int]:
    """The size to bench: the one asked for, which a static engine must have been compiled for."""
    packed = pipe.layout.packs_latents
    f = pipe.layout.size_multiple  # FLUX packs 2x2 latents into a token
    shape = pipe.components[pipe.config.denoiser].inputs[0].shape
    static = [None, None] if packed else [d * f if isinstance(d, int) and d > 0 else None for d in shape[2:4]]
    height = config.height or static[0] or pipe.config.default_size
    width = config.width or static[1] or pipe.config.default_size
    for name, side, fixed in (("height", height, static[0]), ("width", width, static[1])):
        if side % f:
            raise InputError(f"{name} must be a multiple of {f}, got {side}")
        if fixed is not None and fixed != side:
            raise ShapeError(f"{pipe.path}: compiled for a static {name} of {fixed}, not {side}; bench it at "
                             f"--height {static[0]} --width {static[1]} or compile it for this size")
    tokens = shape[1] if packed else None
    if isinstance(tokens, int) and tokens > 0 and tokens != (height // f) * (width // f):
        raise ShapeError(f"{pipe.path}: the transformer was compiled for {tokens} image tokens, not the "
                         f"{(height // f) * (width // f)} of {height}x{width}; bench it at the size it was compiled for")
    rows, per = shape[0], 2 if pipe.layout.batched_cfg else 1
    if isinstance(rows, int) and rows > 0 and rows != per * config.images:
        raise ShapeError(f"{pipe.path}: the {pipe.config.denoiser} was compiled for {rows} rows (batch "
                         f"{rows // per}{' with CFG' if per == 2 else ''}), not {per * config.images}; bench it "
                         f"with --batch {rows // per}")
    return height, width


def _concrete(spec: TensorSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    try:
        return tuple(d if isinstance(d, int) and d >= 0 else dims[str(d)] for d in spec.shape)
    except KeyError as exc:
        raise ShapeError(f"input {spec.name!r} has a symbolic dimension {exc} the pipeline bench cannot fill") from None


def _plan(pipe: Any, config: PipelineBenchConfig) -> _Plan:
    from enginekit.runtimes.schedulers import make_scheduler
    cfg, layout = pipe.config, pipe.layout
    height, width = _size(pipe, config)
    f, n, two_pass = cfg.vae_scale_factor, config.images, layout.batched_cfg
    rng = np.random.default_rng(config.seed)
    seq_len = cfg.max_sequence_length if layout.uses_t5 else None
    texts = ["", config.prompt] if two_pass else [config.prompt]
    ids = {}
    for enc in cfg.text_encoders:
        tok = pipe.tokenizer(enc.tokenizer)
        ids[enc.component] = np.asarray(tok.encode(texts, max_length=seq_len if tok.kind == "t5" else None)
                                        .input_ids, dtype=np.int64)
    name = config.scheduler or cfg.default_scheduler
    sched = make_scheduler(name, cfg.scheduler)
    mu = layout.set_timesteps(sched, config.steps, height, width)
    t = float(np.asarray(sched.timesteps)[0])
    seq = layout.prompt_length(seq_len) if seq_len else next(iter(ids.values())).shape[1]
    rows = 2 * n if two_pass else n
    dims = {"batch": rows, "sequence": seq, "latent_height": height // f, "latent_width": width // f,
            "image_sequence": (height // (2 * f)) * (width // (2 * f))}
    denoiser = cfg.denoiser
    feeds: dict[str, np.ndarray] = {}
    for spec in pipe.components[denoiser].inputs:
        shape = _concrete(spec, dims)
        if spec.name == "timestep":  # FLUX's transformer takes the sigma, t / 1000
            feeds[spec.name] = layout.timestep(t, shape[0])
        elif spec.name == "time_ids":
            feeds[spec.name] = np.tile(np.array([height, width, 0, 0, height, width], np.float32), (shape[0], 1))
        elif spec.name not in ("txt_ids", "img_ids", "guidance"):
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    feeds.update(layout.extra_inputs(pipe, feeds["encoder_hidden_states"].shape[1], height, width, rows,
                                     config.guidance_scale))
    # Each feed as the engine declares it, as the pipeline casts them (GenAI's and optimum's UNets take an int64 timestep).
    types = {spec.name: spec.dtype for spec in pipe.components[denoiser].inputs}
    feeds = {k: v.astype(types[k], copy=False) if types.get(k, "bfloat16") != "bfloat16" else v for k, v in feeds.items()}
    latents = rng.standard_normal(layout.unpacked_shape(n, height, width), dtype=np.float32)
    decoder_in = rng.standard_normal(latents.shape, dtype=np.float32)
    encoder_in = rng.uniform(-1.0, 1.0, (1, 3, height, width)).astype(np.float32)
    return _Plan(height, width, name, ids, denoiser, feeds, two_pass, layout.pack(latents),
                 decoder_in, encoder_in, t, mu, layout)


# ---------------------------------------------------------------- the two sides


def _engine_parts(pipe: Any, plan: _Plan, config: PipelineBenchConfig,
                  out: dict[str, Any]) -> dict[str, tuple[int, Callable[[], Any]]]:
    """part -> (rows per call, callable) on the engine; the image's pixels land in ``out``."""
    from enginekit.runtimes.schedulers import make_scheduler

    comps, g = pipe.components, np.float32(config.guidance_scale)
    parts: dict[str, tuple[int, Callable[[], Any]]] = {}
    for name, ids in plan.ids.items():
        feeds = {comps[name].inputs[0].name: ids}
        parts[f"component:{name}"] = (len(ids), lambda r=comps[name], x=feeds: r.run(x))
    unet = comps[plan.denoiser]
    parts[f"component:{plan.denoiser}"] = (len(plan.unet["sample"]), lambda: unet.run(plan.unet))
    parts["component:vae_decoder"] = (len(plan.decoder_in),
                                      lambda: comps["vae_decoder"].run({"latent_sample": plan.decoder_in}))
    if "vae_encoder" in comps:
        parts["component:vae_encoder"] = (1, lambda: comps["vae_encoder"].run({"sample": plan.encoder_in}))
    sched = make_scheduler(plan.scheduler, pipe.config.scheduler)

    def step() -> np.ndarray:
        plan.layout.set_timesteps(sched, config.steps, plan.height, plan.width)  # a fresh index: each timed step is the first
        x = np.concatenate([plan.latents, plan.latents]) if plan.cfg else plan.latents
        x = sched.scale_model_input(x, plan.timestep)
        eps = unet.run({**plan.unet, "sample": x.astype(np.float32)})["out_sample"]
        if plan.cfg:
            uncond, text = np.split(eps, 2)
            eps = uncond + g * (text - uncond)
        return sched.step(eps, plan.timestep, plan.latents)

    def image() -> None:
        out["image"] = pipe(config.prompt, negative_prompt="" if plan.cfg else None,
                            num_inference_steps=config.steps,
                            guidance_scale=config.guidance_scale, height=plan.height, width=plan.width,
                            num_images_per_prompt=config.images, latents=plan.latents, scheduler=plan.scheduler,
                            output_type="np").images

    parts["step"] = (config.images, step)
    parts["image"] = (config.images, image)
    return parts


# diffusers' pipeline of the artifact's weights lives beside export's source resolution.
_diffusers_pipeline = reference_pipeline


def _torch_parts(dpipe: Any, plan: _Plan, config: PipelineBenchConfig,
                 out: dict[str, Any]) -> dict[str, tuple[int, Callable[[], Any]]]:
    """The same parts on diffusers' modules, with the same feeds."""
    import diffusers
    import torch

    cls_name, overrides = DIFFUSERS_SCHEDULERS[plan.scheduler]
    dpipe.scheduler = getattr(diffusers, cls_name).from_config(dpipe.scheduler.config, **overrides)
    dpipe.set_progress_bar_config(disable=True)
    sched, g = dpipe.scheduler, config.guidance_scale
    tt = {k: torch.from_numpy(v) for k, v in plan.unet.items()}
    latents, t = torch.from_numpy(plan.latents), torch.tensor(plan.timestep)
    if plan.denoiser == "unet":
        added = {"text_embeds": tt["text_embeds"], "time_ids": tt["time_ids"]} if "time_ids" in tt else None
        unet_kw = {"timestep_cond": tt.get("timestep_cond"), "added_cond_kwargs": added, "return_dict": False}

        def denoise(x: Any, timestep: Any) -> Any:
            return dpipe.unet(x, timestep, tt["encoder_hidden_states"], **unet_kw)[0]
    else:  # SD3's and FLUX's transformer take keywords; FLUX's timestep is the sigma
        extra = {k: tt[k] for k in ("pooled_projections", "txt_ids", "img_ids", "guidance") if k in tt}
        scale = 1000.0 if "img_ids" in tt else 1.0

        def denoise(x: Any, timestep: Any) -> Any:
            return dpipe.transformer(hidden_states=x, timestep=(timestep / scale).expand(x.shape[0]),
                                     encoder_hidden_states=tt["encoder_hidden_states"], return_dict=False,
                                     **extra)[0]
    timestep_kw = {"mu": plan.mu, "sigmas": np.linspace(1.0, 1.0 / config.steps, config.steps)} \
        if not plan.cfg else {}
    dec_in, enc_in = torch.from_numpy(plan.decoder_in), torch.from_numpy(plan.encoder_in)
    parts: dict[str, tuple[int, Callable[[], Any]]] = {}
    for name, ids in plan.ids.items():
        parts[f"component:{name}"] = (len(ids), lambda m=getattr(dpipe, name), x=torch.from_numpy(ids):
                                      m(x, output_hidden_states=True))
    parts[f"component:{plan.denoiser}"] = (len(plan.unet["sample"]), lambda: denoise(
        tt["sample"], tt["timestep"][0] * plan.layout.timestep_scale))
    parts["component:vae_decoder"] = (len(plan.decoder_in), lambda: dpipe.vae.decode(dec_in, return_dict=False))
    parts["component:vae_encoder"] = (1, lambda: dpipe.vae.encode(enc_in).latent_dist.parameters)

    def step() -> Any:
        sched.set_timesteps(config.steps, **timestep_kw)
        x = torch.cat([latents, latents]) if plan.cfg else latents
        if hasattr(sched, "scale_model_input"):  # flow matching has none: its input is unscaled
            x = sched.scale_model_input(x, t)
        eps = denoise(x, t)
        if plan.cfg:
            uncond, text = eps.chunk(2)
            eps = uncond + g * (text - uncond)
        return sched.step(eps, t, latents, return_dict=False)[0]

    def image() -> None:
        out["image"] = dpipe(config.prompt, negative_prompt="" if plan.cfg else None,
                             num_inference_steps=config.steps,
                             guidance_scale=g, height=plan.height, width=plan.width,
                             num_images_per_prompt=config.images, latents=latents.clone(), output_type="np").images

    parts["step"] = (config.images, step)
    parts["image"] = (config.images, image)
    return parts


def _time_parts(parts: Mapping[str, tuple[int, Callable[[], Any]]], config: PipelineBenchConfig, label: str,
                progress: bool, rss: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """part -> result (``bench_runner``'s fields plus ``first_inference_ms``), in the order of ``parts``."""
    proc = psutil.Process()
    results: dict[str, dict[str, Any]] = {}
    for part, (rows, fn) in parts.items():
        if part == "image":
            if config.image_runs == 0:
                continue
            # No cold call or warm-up: a whole image costs minutes, and the parts before warmed its components.
            cfg, first_ms = BenchConfig(warmup=0, runs=config.image_runs, threads=config.threads), None
        else:
            start = time.perf_counter()
            fn()  # the cold call, which also counts as the first warm-up call
            first_ms = (time.perf_counter() - start) * 1e3
            cfg = replace(config.timing(), warmup=max(config.warmup - 1, 0))
        with _progress_bar(f"{label} {part}", cfg.runs, progress) as bar:
            def tick(_i: int, bar: Any = bar) -> None:
                bar.update(1)
                if rss is not None:
                    rss.append(proc.memory_info().rss)
            samples = time_callable(fn, cfg, on_progress=tick)
        stats = latency_stats(samples)
        results[part] = {"batch": rows, "latency_ms": stats, "runs": len(samples),
                         "throughput_ips": rows * 1000.0 / stats["p50"], "first_inference_ms": first_ms}
    return results


# ---------------------------------------------------------------- the bench


def _open_pipeline(path: Path, device: str, backend: str | None, threads: int) -> tuple[Any, Manifest, str, int]:
    """``enginekit.load`` with the thread count pinned in the manifest target the runners read at load.

    Returns the pipeline, the manifest as on disk, the backend name and the threads in
    effect: ``threads``, else what the artifact recorded, else the physical cores.
    """
    import os

    from enginekit.api import Components, default_backend, resolve_device
    from enginekit.artifact import verify_artifact
    from enginekit.errors import BackendError
    from enginekit.manifest import read_manifest
    from enginekit.registry import expect_stage, get_backend, task_class

    manifest = read_manifest(path)
    expect_stage(manifest.task, "bench", "enginekit.bench.stages:bench_pipelines")
    verify_artifact(path, manifest)
    name = backend or default_backend(manifest)
    be = get_backend(name)
    if manifest.kind not in be.loads:
        raise BackendError(f"backend {name!r} cannot load a {manifest.kind!r} artifact; "
                           f"compile it first: enginekit compile {path} --backend {name} -o OUT")
    key = be.threads_key
    recorded = int(manifest.target.get(key) or 0) if key else 0
    threads = threads or recorded or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    pinned = manifest.replace(target={**manifest.target, key: threads}) if key else manifest
    components = Components(path, pinned, be, resolve_device(be, device))
    return task_class(manifest.task).from_artifact(components, pinned, path), manifest, name, threads


def _torch_side(dpipe: Any, plan: _Plan, config: PipelineBenchConfig, threads: int, label: str,
                progress: bool, out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return _time_parts(_torch_parts(dpipe, plan, config, out), config, label, progress)
    finally:
        torch.set_num_threads(previous)


def bench_pipeline(
    path: str | Path,
    config: PipelineBenchConfig,
    device: str = "cpu",
    backend: str | None = None,
    *,
    baseline: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Time a text-to-image artifact's components, one denoising step and a whole image;
    one record per part (see the module docstring), speed-ups filled where a baseline ran.

    Steps: 1. open the engine with the threads pinned and load every component
    (``load_ms``: each component's load; the step and image records carry the sum);
    2. build the seeded feeds and initial latents at the size benched; 3. with
    ``baseline``, rebuild diffusers' pipeline from the provenance and time its parts;
    4. time the engine's parts; 5. time diffusers' parts again and keep, per part, the
    faster of the two runs as the baseline record.
    ``peak_rss_bytes`` on engine records is the largest RSS sampled while the engine ran,
    without a baseline only (with one, the process also holds the PyTorch pipeline).
    """
    path = Path(path)
    hw, proc = fingerprint(), psutil.Process()
    pipe, manifest, name, threads = _open_pipeline(path, device, backend, config.threads)
    config = replace(config, threads=threads)
    try:
        loads: dict[str, float] = {}
        for comp in (pipe.config.denoiser, "vae_decoder", "vae_encoder", *(e.component for e in pipe.config.text_encoders)):
            if comp in pipe.components:
                start = time.perf_counter()
                pipe.components[comp]  # noqa: B018 - loads it
                loads[comp] = (time.perf_counter() - start) * 1e3
        rss = [proc.memory_info().rss]
        plan = _plan(pipe, config)
        pixels: dict[str, dict[str, Any]] = {"engine": {}, "before": {}, "after": {}}
        dpipe = _diffusers_pipeline(manifest) if baseline else None
        before = (_torch_side(dpipe, plan, config, threads, "pytorch (before)", progress, pixels["before"])
                  if baseline else {})
        ours = _time_parts(_engine_parts(pipe, plan, config, pixels["engine"]), config, path.name, progress, rss)
        after = (_torch_side(dpipe, plan, config, threads, "pytorch (after)", progress, pixels["after"])
                 if baseline else {})
        engine = engine_info(path, manifest, name, pipe.device)
        torch_sizes = _parameter_bytes(dpipe, manifest) if baseline else {}
    finally:
        pipe.close()
    del dpipe

    sizes = {c: sum(f.size for f in manifest.components[c].files) for c in manifest.components}
    common = {"threads": threads, "hardware": hw, "model": manifest.provenance.get("source")}
    extra = {"height": plan.height, "width": plan.width, "steps": config.steps}
    records = []
    for part, result in ours.items():
        comp = part.split(":", 1)[1] if part.startswith("component:") else None
        # With the baseline this process also holds diffusers: its RSS is not the engine's, so none is given.
        rec = make_record(engine=engine, result=result, load_ms=loads.get(comp) if comp else sum(loads.values()),
                          first_inference_ms=result["first_inference_ms"],
                          peak_rss_bytes=None if baseline else max(rss),
                          size_bytes=sizes.get(comp) if comp else sum(sizes.values()),
                          fidelity=_image_fidelity(pixels) if part == "image" else None, **common,
                          conditions={"own_process": False, "peak_rss_how": "sampled in the bench's process"})
        records.append({**rec, "part": part, **extra})
    torch_engine = {"artifact": None, "name": "diffusers-pytorch-eager", "kind": "pytorch", "backend": "pytorch",
                    "device": "cpu", "method": "float", "precision": "fp32", "manifest_sha256": None,
                    "inference_precision": "f32"}
    for part, first in before.items():
        second = after[part]
        best = min(first, second, key=lambda r: r["latency_ms"]["p50"])
        comp = part.split(":", 1)[1] if part.startswith("component:") else None
        rec = make_record(engine=torch_engine, result=best, first_inference_ms=first["first_inference_ms"],
                          size_bytes=torch_sizes.get(comp),
                          baseline=True, **common)
        records.append({**rec, "part": part, **extra, "baseline_p50_ms": {
            "before": first["latency_ms"]["p50"], "after": second["latency_ms"]["p50"]}})
    add_speedups(records)
    return records


def _parameter_bytes(dpipe: Any, manifest: Manifest) -> dict[str | None, int]:
    """Bytes of each PyTorch module's parameters by component (the VAE parts share one VAE); None: all."""
    modules = {c: getattr(dpipe, "vae" if c.startswith("vae_") else c, None) for c in manifest.components}
    sizes: dict[str | None, int] = {c: sum(p.numel() * p.element_size() for p in m.parameters())
                                    for c, m in modules.items() if m is not None}
    sizes[None] = sum(sizes[c] for c in {id(m): c for c, m in modules.items() if m is not None}.values())
    return sizes


def _image_fidelity(pixels: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """How far the engine's image is from diffusers' (same latents, same scheduler), in [0, 1] pixels."""
    ours, theirs = pixels["engine"].get("image"), pixels["after"].get("image")
    if ours is None or theirs is None:
        return {}
    diff = np.abs(np.asarray(ours, np.float32) - np.asarray(theirs, np.float32))
    return {"image_max_abs": float(diff.max()), "image_mean_abs": float(diff.mean())}


def baseline_note(records: Sequence[Mapping[str, Any]]) -> str | None:
    """One line on how the speed-ups were taken, from a run's pipeline baseline records (None without any)."""
    steps = [r for r in records if r.get("baseline") and r.get("part") == "step" and "baseline_p50_ms" in r]
    if not steps:
        return None
    b = steps[-1]["baseline_p50_ms"]
    return (f"PyTorch (diffusers, fp32 eager, {steps[-1]['threads']} threads) was timed before and after the "
            f"engine; speed-ups divide by the faster of the two (step p50 {b['before']:.1f} ms before, "
            f"{b['after']:.1f} ms after)")
