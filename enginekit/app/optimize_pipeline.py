"""``optimize`` for diffusion pipelines: the fastest assembly per denoising step within an image-PSNR budget.

1. export the float ONNX pipeline once (every component parity-checked against PyTorch);
2. diffusers' fp32 pipeline of the same weights (rebuilt from the export's provenance)
   draws the reference image of every held-out (prompt, seed) pair, timed (the baseline);
3. plan the candidates: each backend × precision as whole-pipeline assemblies (all
   fp32, all fp16) and mixed ones (the denoiser at fp16/int8/int4, the rest fp32: the
   usual win, since the VAE is what half precision hurts and the denoiser is what runs
   every step). fp32/fp16 build through ``compile`` (OpenVINO compresses weights to
   fp16; the CPU then computes in bf16 where it has AMX/AVX512-BF16, the fp32 components
   pinned to f32); quantized ones through :func:`enginekit.quant.diffusion.quantize_pipeline`
   where it is installed, else they are skipped;
4. each built candidate generates the held-out images on the reference's latents, alone
   in the process (one warm-up image first); its worst PSNR against diffusers is
   judged against the budget, and the same generations time its steps, its whole
   images and each component's calls, repeated for time only until the config's
   :class:`~enginekit.bench.pipeline_images.TimingRule` is met (or its time is spent).
   A step always contains the denoiser's call: a step time below that call is an
   impossible timing, re-measured up to :data:`REMEASURES` times and, if it stays,
   never picked (status ``unreliable``);
5. diffusers is timed again after the engines; speed-ups divide by the faster run;
6. the fastest per step within the budget is copied atomically to OUT, with
   ``report.md`` and ``report.json`` saying what became of every candidate and which
   component each speed-up came from (per-component times against the all-fp32
   candidate of the same backend), and the commands that rebuild it.

Nothing is written to OUT when no candidate meets the budget; the report then stays
in the work folder, whose path the error names.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from enginekit.app.optimize_pipeline_plan import (HELD_OUT_PROMPTS, PRECISIONS, QUANTIZE_MISSING, REMEASURES,
                                                  PipelineCandidate, PipelineOptimizeConfig,
                                                  plan_pipeline_candidates)
from enginekit.app.optimize_pipeline_report import HEADERS, render_pipeline_report, table_rows, table_text
from enginekit.app.optimize_workspace import refuse_without_pick, workspace
from enginekit.bench.pipeline_images import Generation, timing_problem
from enginekit.errors import ArtifactError, InputError, one_line

__all__ = ["HELD_OUT_PROMPTS", "PipelineCandidate", "PipelineOptimizeConfig", "optimize_pipeline",
           "plan_pipeline_candidates", "select", "render_pipeline_report", "QUANTIZE_MISSING", "measure_timing",
           "REMEASURES", "PRECISIONS", "HEADERS", "table_rows", "table_text"]


# --------------------------------------------------------------------------- building


def _quantize_pipeline() -> Callable[..., Any]:
    """Q's quantizer, imported lazily; ImportError when it is not installed."""
    from enginekit.quant.diffusion import quantize_pipeline  # noqa: PLC0415

    return quantize_pipeline


def _build(cand: PipelineCandidate, onnx_dir: Path, work: Path, components: Sequence[str],
           config: PipelineOptimizeConfig, size: int, on_step: Callable[[str], None]) -> Path:
    from enginekit.app.build import build_engine

    dest = work / "candidates" / cand.name
    if cand.builder is not None:
        return cand.builder(onnx_dir, dest)
    source = onnx_dir
    if cand.how == "quantize":
        quantize = _quantize_pipeline()
        qdir = work / "quantized" / cand.name
        per = {c: cand.precisions.get(c, cand.precisions.get("*", "fp32")) for c in components}
        on_step(f"quantize_pipeline {cand.method} for {cand.backend}: "
                + ", ".join(f"{c} {p}" for c, p in per.items()))
        quantize(onnx_dir, qdir, cand.method, backend=cand.backend, components=per,
                 calibration_prompts=config.calibration_prompts, group_size=config.group_size,
                 check_fidelity=False, overwrite=True, on_step=on_step)
        source = qdir
        if cand.backend != "openvino":
            return qdir  # ONNX Runtime runs the quantized graphs as they are
    ov = cand.backend == "openvino"
    on_step(f"compile {cand.name}")
    build_engine(source, cand.backend, dest, device="cpu", threads=config.threads,
                 precision=cand.compile_precision, height=size if ov else None, width=size if ov else None,
                 batch=1 if ov else None, options=dict(cand.compile_options), overwrite=True)
    return dest


# --------------------------------------------------------------------------- selection


def select(outcomes: Sequence[dict[str, Any]], min_psnr: float, min_ssim: float | None = None) -> str | None:
    """Mark every judged outcome ``missed`` (with its numbers), ``unreliable`` (an impossible
    timing that stayed after re-measuring), ``slower`` or ``picked``: the fastest per denoising
    step whose worst image keeps the budget. Returns the pick's name. A pick whose lead over the
    runner-up lies inside both step medians' confidence intervals says so in its reason."""
    passing = []
    for oc in outcomes:
        if oc["status"] != "judged":
            continue
        fid = oc["fidelity"]
        misses = []
        if fid["psnr_db_min"] < min_psnr:
            misses.append(f"PSNR {fid['psnr_db_min']:.2f} dB < {min_psnr:g} dB (worst image)")
        if min_ssim is not None and fid.get("ssim_min") is not None and fid["ssim_min"] < min_ssim:
            misses.append(f"SSIM {fid['ssim_min']:.4f} < {min_ssim:g}")
        impossible = (oc.get("timing") or {}).get("impossible")
        if misses:
            oc["status"], oc["reason"] = "missed", "missed budget: " + "; ".join(misses)
        elif impossible:
            n = oc["timing"].get("measurements", 1)
            oc["status"], oc["reason"] = "unreliable", f"not picked: {impossible} (measured {n} times)"
        else:
            passing.append(oc)
    if not passing:
        return None
    fastest = min(passing, key=lambda oc: oc["timing"]["step_ms"])
    best = _faster_image_in_a_tie(fastest, passing)
    rest = sorted((oc for oc in passing if oc is not best), key=lambda oc: oc["timing"]["step_ms"])
    for oc in passing:
        if oc is best and best is not fastest:
            oc["status"], oc["reason"] = "picked", (
                f"tied per step with {fastest['candidate']['name']} ({best['timing']['step_ms']:.1f} ms, inside its "
                f"95% interval up to {fastest['timing']['step_ci_ms'][1]:.1f} ms), and the faster whole image "
                f"({best['timing']['image_ms']:.0f} vs {fastest['timing']['image_ms']:.0f} ms)")
        elif oc is best:
            oc["status"], oc["reason"] = "picked", "fastest per step within the budget"
            ci, other = best["timing"].get("step_ci_ms"), rest[0]["timing"].get("step_ci_ms") if rest else None
            if ci and other and other[0] <= ci[1]:
                oc["reason"] += (f"; within the timing noise of {rest[0]['candidate']['name']} (95% intervals of "
                                 f"the step median {ci[0]:.1f}-{ci[1]:.1f} and {other[0]:.1f}-{other[1]:.1f} ms)")
        else:
            oc["status"] = "slower"
            oc["reason"] = (f"slower per step than {best['candidate']['name']} "
                            f"({oc['timing']['step_ms']:.1f} vs {best['timing']['step_ms']:.1f} ms)")
    return best["candidate"]["name"]


def _faster_image_in_a_tie(best: dict[str, Any], passing: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Among the candidates whose step median lies inside the fastest's 95% interval (a tie on the
    step: the timing cannot order them) and that were judged at the same steps, the one with the
    fastest whole image (a VAE in bf16 against one in f32 shows there, not in the step)."""
    ci = best["timing"].get("step_ci_ms")
    if not ci:
        return best
    tied = [oc for oc in passing if oc.get("steps") == best.get("steps") and oc["timing"].get("image_ms")
            and oc["timing"]["step_ms"] <= ci[1]]
    return min(tied, key=lambda oc: oc["timing"]["image_ms"]) if tied else best


def _attribute(outcomes: Sequence[dict[str, Any]], baseline: Mapping[str, Any]) -> None:
    """Speed-ups against diffusers, and per component against the all-fp32 candidate of the same backend."""
    ref = {oc["candidate"]["backend"]: oc for oc in outcomes
           if oc["candidate"]["name"] == f"{oc['candidate']['backend']}-fp32" and oc.get("timing")}
    for oc in outcomes:
        t = oc.get("timing")
        if not t:
            continue
        oc["speedup_step"] = baseline["step_ms"] / t["step_ms"] if t.get("step_ms") else None
        # A cached candidate judged at other steps has no whole-image ratio to the baseline's images.
        oc["speedup_image"] = baseline["image_ms"] / t["image_ms"] if t.get("image_ms") and "steps" not in oc else None
        base = ref.get(oc["candidate"]["backend"])
        if base is None or base is oc:
            continue
        b = base["timing"]
        per = {c: b["components_ms"][c] / ms for c, ms in t["components_ms"].items()
               if ms and b["components_ms"].get(c)}
        # Time saved per image: a text encoder runs once an image, the denoiser once a step.
        calls = t.get("calls_per_image") or {}
        saved = {c: (b["components_ms"][c] - ms) * calls.get(c, 1.0) for c, ms in t["components_ms"].items()
                 if b["components_ms"].get(c)}
        oc["vs_fp32"] = {"candidate": base["candidate"]["name"], "step": b["step_ms"] / t["step_ms"],
                         "components": per, "saved_ms_per_image": saved,
                         "from": max(saved, key=lambda c: saved[c]) if saved and max(saved.values()) > 0 else None}


# --------------------------------------------------------------------------- the run


def measure_timing(measure: Callable[[], Generation], remeasures: int = REMEASURES,
                   on_step: Callable[[str], None] = lambda msg: None) -> tuple[Generation, dict[str, Any]]:
    """``measure()`` and its timing summary; while the timing is impossible
    (:func:`~enginekit.bench.pipeline_images.timing_problem`), measured again, up to
    ``remeasures`` times. The summary says how many measurements it took and, when the
    last one was still impossible, why (``impossible``): :func:`select` never picks it."""
    problems: list[str] = []
    while True:
        gen = measure()
        summary = gen.summary()
        problem = timing_problem(summary)
        if problem is None or len(problems) >= remeasures:
            break
        problems.append(problem)
        on_step(f"  {problem}; measuring again")
    summary["measurements"] = len(problems) + 1
    if problems:
        summary["remeasured_because"] = problems
    if problem is not None:
        summary["impossible"] = problem
    return gen, summary


def _held_out(prompts: Sequence[str]) -> list[str]:
    """The prompts less any a quantizer calibrates on (so the judge never sees calibration prompts)."""
    try:
        from enginekit.quant import diffusion

        calibration = set(getattr(diffusion, "CALIBRATION_PROMPTS", ()))
    except ImportError:
        calibration = set()
    kept = [p for p in prompts if p not in calibration]
    if not kept:
        raise InputError("every held-out prompt is also a calibration prompt; give others (--prompts FILE)")
    return kept


def optimize_pipeline(
    model: str,
    out: str | Path,
    config: PipelineOptimizeConfig = PipelineOptimizeConfig(),  # noqa: B008 - frozen dataclass
    *,
    random_weights: bool = False,
    revision: str | None = None,
    seed: int = 0,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    extra_candidates: Sequence[PipelineCandidate] = (),
    on_step: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Build, judge and time every candidate assembly of pipeline ``model``; write the fastest per
    step within the PSNR budget to ``out``. Returns the report (also ``out/report.json``).
    ``extra_candidates`` are tried beside the planned ones."""
    from enginekit.registry import backend_class, backend_names

    config.check()
    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another output or pass --overwrite")
    installed = [b for b in backend_names() if backend_class(b).is_available()]
    backends = list(config.backends) if config.backends else installed
    for name in backends:
        backend_class(name)  # an unknown name raises UnknownBackendError naming the known ones
        if name not in installed:
            raise InputError(f"backend {name!r} is not installed here (installed: {', '.join(installed) or 'none'})")
    prompts = _held_out(config.prompts)
    with workspace(out, work_dir) as work:
        report = _run(model, out, work, backends, prompts, config, random_weights=random_weights,
                      revision=revision, seed=seed, overwrite=overwrite, extra=extra_candidates, on_step=on_step)
    return report


@dataclass(frozen=True)
class _Run:
    """What one pipeline ``optimize`` run works with, once the export and the plan are made."""

    model: str
    out: Path
    work: Path
    config: PipelineOptimizeConfig
    onnx_dir: Path
    components: tuple[str, ...]
    size: int
    plan: Any  # GenerationPlan
    jobs: tuple[Any, ...]  # ImageJob
    threads: int
    on_step: Callable[[str], None]


def _judge_candidate(run: _Run, cand: PipelineCandidate, reference: Sequence[Any], built: Path | None = None,
                     plan: Any = None) -> dict[str, Any]:
    """Build ``cand`` (or run it on the engine ``built`` already), generate the held-out images with
    it (``plan``: the run's, or a cached candidate's own steps), judge and time them: its outcome."""
    from enginekit.bench.pipeline_images import engine_images, judge_images
    from enginekit.manifest import read_manifest

    oc: dict[str, Any] = {"candidate": cand.to_dict(), "status": "pending", "reason": ""}
    plan = plan or run.plan
    if plan is not run.plan:
        oc["steps"] = plan.steps
    start = time.perf_counter()
    try:
        path = built or _build(cand, run.onnx_dir, run.work, run.components, run.config, run.size, run.on_step)
    except ImportError as exc:
        if cand.how != "quantize":
            raise
        oc["status"], oc["reason"] = "skipped", f"{QUANTIZE_MISSING} ({one_line(exc, with_type=True)})"
        run.on_step(f"  {oc['reason']}")
        return oc
    except Exception as exc:  # one candidate's failure (any library's) must not end the run
        oc["status"], oc["reason"] = "failed", one_line(exc, with_type=True)
        run.on_step(f"  failed: {oc['reason']}")
        return oc
    oc["build_s"] = time.perf_counter() - start
    oc["path"] = str(path)
    try:
        gen, oc["timing"] = measure_timing(
            lambda: engine_images(path, cand.backend, run.jobs, plan, run.threads, rule=run.config.timing,
                                  cache=cand.cache)[0],
            on_step=run.on_step)
        oc["fidelity"] = judge_images(reference, gen.images, run.jobs)
    except Exception as exc:
        oc["status"], oc["reason"] = "failed", one_line(exc, with_type=True)
        oc.pop("timing", None)
        run.on_step(f"  failed: {oc['reason']}")
        return oc
    oc["status"] = "judged"
    oc["size_bytes"] = sum(f.size for c in read_manifest(path).components.values() for f in c.files)
    run.on_step(f"  worst PSNR {oc['fidelity']['psnr_db_min']:.2f} dB; step {oc['timing']['step_ms']:.1f} ms "
                f"({oc['timing']['step_samples']} samples), image {oc['timing']['image_ms']:.0f} ms")
    return oc


def _time_diffusers(run: _Run, manifest: Any, jobs: Sequence[Any], plan: Any = None) -> tuple[Any, dict[str, Any]]:
    """diffusers' fp32 pipeline on ``jobs`` (``plan``: the run's by default), timed under the run's
    rule (re-measured when impossible)."""
    import gc

    from enginekit.export.diffusion.reference import reference_pipeline as _diffusers_pipeline
    from enginekit.bench.pipeline_images import diffusers_images

    dpipe = _diffusers_pipeline(manifest)
    try:
        return measure_timing(lambda: diffusers_images(dpipe, jobs, plan or run.plan, run.threads,
                                                       rule=run.config.timing), on_step=run.on_step)
    finally:
        del dpipe
        gc.collect()


def _run(model: str, out: Path, work: Path, backends: list[str], prompts: list[str], config: PipelineOptimizeConfig,
         *, random_weights: bool, revision: str | None, seed: int, overwrite: bool,
         extra: Sequence[PipelineCandidate], on_step: Callable[[str], None]) -> dict[str, Any]:
    from enginekit.bench.pipeline_images import ImageJob, generation_plan
    from enginekit.export.api import export_model
    from enginekit.hardware import fingerprint
    from enginekit.runtimes.tasks.text_to_image import PipelineConfig

    hw = fingerprint()
    onnx_dir = work / "onnx"
    on_step(f"1. export {model} -> {onnx_dir}")
    manifest = export_model(model, onnx_dir, task="text-to-image", random_weights=random_weights, revision=revision,
                            seed=seed, image_check=False, without_t5=config.without_t5, streaming=config.streaming,
                            overwrite=True,
                            on_step=lambda m: on_step("  " + m))
    pcfg = PipelineConfig.from_section(manifest.task_config)
    size = config.size or pcfg.default_size
    run = _Run(model=model, out=out, work=work, config=config, onnx_dir=onnx_dir,
               components=tuple(manifest.components), size=size,
               plan=generation_plan(manifest.task_config, size, config.steps, config.guidance),
               jobs=tuple(ImageJob(p, s) for p in prompts for s in config.seeds),
               threads=config.threads or hw.get("physical_cores") or 1, on_step=on_step)
    candidates = plan_pipeline_candidates(backends, config.precisions, run.components, pcfg.denoiser, size=size,
                                          cpu_flags=hw.get("flags") or []) + list(extra)

    on_step(f"2. diffusers fp32 eager: {len(run.jobs)} reference image(s) at {size}x{size}, {config.steps} steps")
    before, b = _time_diffusers(run, manifest, run.jobs)
    on_step(f"  step {b['step_ms']:.1f} ms ({b['step_samples']} samples), image {b['image_ms']:.0f} ms")
    outcomes: list[dict[str, Any]] = []
    for i, cand in enumerate(candidates, 1):
        on_step(f"3. [{i}/{len(candidates)}] {cand.name}: {cand.description}")
        outcomes.append(_judge_candidate(run, cand, before.images))
    outcomes += _cached_outcomes(run, manifest, candidates, outcomes, before.images)
    on_step("5. diffusers fp32 eager again, after the engines")
    _, a = _time_diffusers(run, manifest, run.jobs[:1])
    baseline = min((b, a), key=lambda s: s["step_ms"])
    baseline = {**baseline, "before": {k: b[k] for k in ("step_ms", "image_ms", "step_samples", "image_samples")},
                "after": {k: a[k] for k in ("step_ms", "image_ms", "step_samples", "image_samples")},
                "threads": run.threads, "drift": a["step_ms"] / b["step_ms"]}
    picked = select(outcomes, config.min_psnr, config.min_ssim)
    _attribute(outcomes, baseline)
    report: dict[str, Any] = {
        "model": model, "family": manifest.family, "output": str(out),
        "source": {k: manifest.provenance.get(k) for k in ("source", "kind", "weights", "seed", "without_t5")
                   if manifest.provenance.get(k) is not None},
        "size": size, "steps": config.steps, "guidance": run.plan.guidance, "scheduler": run.plan.scheduler,
        "denoiser": pcfg.denoiser, "held_out": {"prompts": prompts, "seeds": list(config.seeds)},
        "budget": {"min_psnr_db": config.min_psnr, "min_ssim": config.min_ssim, "judged_on": "worst image"},
        "config": {k: v for k, v in asdict(config).items() if k != "prompts"},
        "hardware": hw, "baseline": baseline, "candidates": outcomes, "picked": picked,
        "timing_rule": {**asdict(config.timing), "text": config.timing.describe(), "remeasures": REMEASURES},
    }
    if config.streaming:  # its rebuild commands export streamed too
        report["source"]["streaming"] = True
    if picked is not None:
        from enginekit.app.rebuild import pipeline_rebuild_commands

        best = next(oc for oc in outcomes if oc["status"] == "picked")
        report["rebuild"] = pipeline_rebuild_commands(report, best["candidate"], list(run.components), seed=seed,
                                                      revision=revision)
    _write(run, report, overwrite)
    return report


def _cached_outcomes(run: _Run, manifest: Any, candidates: Sequence[PipelineCandidate],
                     outcomes: Sequence[dict[str, Any]], reference: Sequence[Any]) -> list[dict[str, Any]]:
    """The config's step caches on the fastest candidates within the budget (per step, and per image
    where that is another; a cache only moves the image further, so one that misses gains nothing
    from it), judged on diffusers' uncached images at the steps that make whole cache cycles;
    DeepCache only on a UNet that gives out its deep features."""
    from dataclasses import replace

    from enginekit.app.optimize_pipeline_plan import DEFAULT_CACHES, cache_steps, cached_candidates
    from enginekit.runtimes.tasks.step_cache import DEEPCACHE_CUT, cache_name
    from enginekit.runtimes.tasks.text_to_image import PipelineConfig

    denoiser = PipelineConfig.from_section(manifest.task_config).denoiser
    deep = set(DEEPCACHE_CUT.inputs) <= {o.name for o in manifest.component(denoiser).outputs}
    caches = DEFAULT_CACHES["deepcache" if deep else "taylorseer"] if run.config.caches is None else run.config.caches
    # DeepCache needs the UNet's deep features; a denoiser without them skips it (named once).
    skipped = [c for c in caches if cache_name(c).startswith("deepcache") and not deep]
    if skipped:
        run.on_step(f"4. {', '.join(skipped)}: skipped, the {denoiser} gives out no deep features "
                    "(a transformer or a streamed UNet; taylorseer:N fits any denoiser)")
    caches = tuple(c for c in caches if c not in skipped)
    if not caches:
        return []
    passing = [oc for oc in outcomes if oc["status"] == "judged" and not oc["timing"].get("impossible")
               and oc["fidelity"]["psnr_db_min"] >= run.config.min_psnr
               and (run.config.min_ssim is None or (oc["fidelity"].get("ssim_min") or 1.0) >= run.config.min_ssim)]
    if not passing:
        return []
    # The fastest per step, and the fastest whole image where that is another (its VAE or text
    # encoder is faster): caching speeds up the steps of either.
    bases = list({id(oc): oc for oc in (min(passing, key=lambda oc: oc["timing"]["step_ms"]),
                                        min(passing, key=lambda oc: oc["timing"]["image_ms"]))}.values())
    references: dict[int, Sequence[Any]] = {run.plan.steps: reference}
    cached = [(cand, oc) for oc in bases
              for cand in cached_candidates(next(c for c in candidates if c.name == oc["candidate"]["name"]),
                                            caches, run.config.steps)]
    made = []
    for i, (cand, base) in enumerate(cached, 1):
        plan = replace(run.plan, steps=cache_steps(run.config.steps, cand.cache or "none"))
        if plan.steps not in references:
            run.on_step(f"4. diffusers fp32 eager: the reference images at {plan.steps} steps")
            references[plan.steps] = _time_diffusers(run, manifest, run.jobs, plan)[0].images
        run.on_step(f"4. [{i}/{len(cached)}] {cand.name}: {cand.description}")
        made.append(_judge_candidate(run, cand, references[plan.steps], built=Path(base["path"]),
                                     plan=plan if plan.steps != run.plan.steps else None))
    return made


def _write(run: _Run, report: dict[str, Any], overwrite: bool) -> None:
    """The pick, its manifest's provenance and the report to OUT atomically; nothing to OUT (the
    report in the work folder, a FidelityError) when nothing was picked."""
    from enginekit.artifact import atomic_artifact, write_manifest
    from enginekit.manifest import read_manifest

    markdown = render_pipeline_report(report)
    picked, outcomes, config, out = report["picked"], report["candidates"], run.config, run.out
    if picked is None:
        refuse_without_pick(run.work, out, report, markdown,
                            f"met the budget (image PSNR >= {config.min_psnr:g} dB against diffusers "
                            f"on every held-out image)",
                            [f"{oc['candidate']['name']}: {oc['status']} ({oc['reason']})" for oc in outcomes],
                            f"{table_text(report)}\n")
    best = next(oc for oc in outcomes if oc["status"] == "picked")
    run.on_step(f"6. picked {picked} -> {out}")
    with atomic_artifact(out, overwrite=overwrite, inputs=(run.model,)) as tmp:
        shutil.copytree(best["path"], tmp, dirs_exist_ok=True)
        m = read_manifest(tmp)
        cache = best["candidate"].get("cache")
        provenance = {**m.provenance, "optimize": {
            "model": run.model, "candidate": picked, "candidates": len(outcomes), "size": run.size,
            "steps": best.get("steps", config.steps), "baseline_step_ms": report["baseline"]["step_ms"],
            "step_ms": best["timing"]["step_ms"], "step_samples": best["timing"]["step_samples"],
            "speedup_step": best.get("speedup_step"), "psnr_db_min": best["fidelity"]["psnr_db_min"],
            **({"cache": cache} if cache else {})}}
        # A cached pick runs cached by default: the setting its images were judged with.
        task = {**m.task_config, "default_cache": cache} if cache else m.task_config
        write_manifest(tmp, m.replace(provenance=provenance, task_config=task,
                                      fidelity={**m.fidelity, "image": best["fidelity"]}))
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (tmp / "report.md").write_text(markdown)
