"""``optimize``: the fastest engine on this machine that keeps its fidelity to PyTorch.

1. export MODEL to ONNX (parity-gated against PyTorch) and keep the PyTorch
   model: it is the fidelity reference and the speed baseline;
2. data: calibration samples and held-out samples, never shared (``builtin``
   digits for the built-in model, crops of real photos otherwise, or ``--data``);
3. PyTorch eager fp32 runs the held-out samples (the reference outputs) and is
   timed through the bench harness at the chosen batch (the baseline);
4. every candidate engine is built: each installed backend × float, half
   (fp16/bf16), int8 and int4, through ``compile`` and ``quantize`` (whose own
   gate against the float ONNX is switched off: the judge here is PyTorch);
5. each candidate that built is measured against the PyTorch reference on two
   held-out sets: samples from the calibration source (never calibrated on) and
   a second, differently made set (``patterns`` beside photos, ``photos`` beside
   the user's data, or ``second_data``), so a pick that only holds on the
   calibration distribution is caught; it passes when its top-1 agreement and
   logits cosine meet the budget on the worse of the two. It is timed in the
   same run as the baseline;
6. the fastest passing candidate is copied atomically to OUT, its manifest's
   ``fidelity`` being the PyTorch comparison, with ``report.md`` and
   ``report.json`` beside it saying what happened to every candidate.

Nothing is written to OUT when no candidate passes; the report then stays in the
work folder, whose path the error names.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.app.optimize_judge import Outcome, datasets, judge, second_spec, torch_outputs
from enginekit.app.optimize_plan import PRECISIONS, Candidate, OptimizeConfig, plan_candidates, token_merged_candidate
from enginekit.app.optimize_report import render_report
from enginekit.app.optimize_workspace import refuse_without_pick, workspace
from enginekit.bench.harness import DRIFT_WARN
from enginekit.errors import ArtifactError, InputError, one_line

__all__ = ["PRECISIONS", "Candidate", "OptimizeConfig", "optimize", "plan_candidates", "render_report", "second_spec"]


# --------------------------------------------------------------------------- the run


def _group_size(onnx_dir: Path, wanted: int) -> int:
    """``wanted`` halved until it divides the model's width (a ViT's linear layers all take
    multiples of it), so int4 works on narrow models too."""
    from enginekit.manifest import read_manifest

    dim = int(read_manifest(onnx_dir).extra.get("embedding_dim") or wanted)
    size = wanted
    while size > 1 and dim % size:
        size //= 2
    return size


def _build(cand: Candidate, onnx_dirs: dict[int, Path], work: Path, built: dict[str, Path], calib_npy: Path | None,
           config: OptimizeConfig, on_step: Callable[[str], None]) -> Path:
    from enginekit.api import compile_artifact
    from enginekit.quant.api import quantize_artifact
    from enginekit.quant.base import QuantOptions
    from enginekit.runtimes.base import CompileOptions

    onnx_dir = onnx_dirs[cand.token_merge]
    if cand.base not in built:
        if cand.method is None:
            built[cand.base] = onnx_dir
        else:
            dest = work / "quantized" / cand.base
            on_step(f"quantize {cand.method} ({cand.quant_backend})")
            # eval_data: the gate is off, and naming a held-out set keeps quantize from splitting
            # the calibration samples again, so they are the ones `quantize -c SPEC` would take.
            quantize_artifact(onnx_dir, dest, cand.method, backend=cand.quant_backend or "onnxruntime",
                              calibration=str(calib_npy) if calib_npy is not None else None,
                              eval_data=str(calib_npy) if calib_npy is not None else None,
                              calibration_size=config.calibration_size,
                              options=QuantOptions(group_size=_group_size(onnx_dir, config.group_size)),
                              check_fidelity=False, overwrite=True)
            built[cand.base] = dest
    source = built[cand.base]
    if cand.compile_extra is None:
        return source
    dest = work / "candidates" / cand.name
    on_step(f"compile {cand.name}")
    compile_artifact(source, cand.backend, dest,
                     CompileOptions(device="cpu", threads=config.threads, extra=dict(cand.compile_extra)),
                     overwrite=True)
    return dest


def optimize(
    model: str,
    out: str | Path,
    config: OptimizeConfig = OptimizeConfig(),  # noqa: B008 - frozen dataclass
    *,
    random_weights: bool = False,
    weights: str | Path | None = None,
    revision: str | None = None,
    seed: int = 0,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Build, judge and time every candidate for ``model``; write the fastest that passes to ``out``.

    Returns the report (also written as ``out/report.json``). ``work_dir`` keeps
    the exported ONNX and every candidate; by default they live in a temporary
    folder beside ``out`` that is removed at the end.
    """
    from enginekit.registry import backend_class, backend_names, expect_stage, source_task

    expect_stage(source_task(model), "optimize", "enginekit.app.optimize_stages:optimize_classifier")
    out = Path(out)
    if out.exists() and not overwrite:  # fail before minutes of work, not after
        raise ArtifactError(f"{out} already exists; choose another output or pass --overwrite")
    if config.batch < 1:
        raise InputError(f"--batch must be a positive batch size, got {config.batch}")
    if config.tie_margin < 0:
        raise InputError(f"the tie margin must be at least 0, got {config.tie_margin}")
    if any(r < 1 for r in config.token_merge):
        raise InputError(f"--token-merge takes positive numbers of token pairs per block, got "
                         f"{', '.join(map(str, config.token_merge))}")
    for what, value in (("agreement", config.min_agreement), ("cosine", config.min_cosine)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"the {what} budget must be between 0 and 1, got {value}")
    unknown = [p for p in config.precisions if p not in PRECISIONS]
    if unknown or not config.precisions:
        raise InputError(f"precisions must be among {', '.join(PRECISIONS)}; got {', '.join(config.precisions) or 'none'}")
    installed = [b for b in backend_names() if backend_class(b).is_available()]
    backends = list(config.backends) if config.backends else installed
    for name in backends:
        backend_class(name)  # unknown names raise UnknownBackendError naming the known ones
        if name not in installed:
            raise InputError(f"backend {name!r} is not installed here (installed: {', '.join(installed) or 'none'})")
    from enginekit.hardware import fingerprint

    hw = fingerprint()
    candidates = plan_candidates(backends, config.precisions, config.batch, static_shape=config.static_shape,
                                 cpu_flags=hw.get("flags") or [])
    if not candidates:
        raise InputError(f"no candidate engines for backends {', '.join(backends)} and precisions "
                         f"{', '.join(config.precisions)}")

    with workspace(out, work_dir) as work:
        run = _RunSettings(model, out, work, config, hw, random_weights=random_weights, weights=weights,
                           revision=revision, seed=seed, overwrite=overwrite, progress=progress, on_step=on_step)
        report = _run(run, candidates)
    return report


@dataclass(frozen=True)
class _RunSettings:
    """What one ``optimize`` run was asked for: the model and its source, where it goes, how it reports."""

    model: str
    out: Path
    work: Path
    config: OptimizeConfig
    hw: dict[str, Any]
    random_weights: bool
    weights: str | Path | None
    revision: str | None
    seed: int
    overwrite: bool
    progress: bool
    on_step: Callable[[str], None]


@dataclass
class _Prepared:
    """The exported model, its data and PyTorch's reference outputs on both held-out sets."""

    src: Any
    manifest: Any
    onnx_dir: Path
    spec: str
    calib: Any
    held: Any
    second: Any
    second_name: str
    calib_npy: Path
    references: list[dict[str, np.ndarray]]
    #: Token pairs merged per block -> that export (0: the plain one; more once merged exports are made).
    onnx_dirs: dict[int, Path]


@dataclass
class _Timings:
    """PyTorch's timing before and after the engines, and the faster of the two (the baseline)."""

    baseline: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    drift: float


def _prepare(run: _RunSettings) -> _Prepared:
    from enginekit.export.sources import resolve_source
    from enginekit.export.vit import ExportOptions, _wrapper_class, export_classifier

    on_step, config = run.on_step, run.config
    on_step(f"loading {run.model}")
    src = resolve_source(run.model, random_weights=run.random_weights, seed=run.seed, weights=run.weights,
                         revision=run.revision)
    onnx_dir = run.work / "onnx"
    on_step(f"export -> {onnx_dir}")
    manifest = export_classifier(src, onnx_dir, ExportOptions(seed=run.seed), overwrite=True)

    from enginekit.quant.api import default_calibration

    spec = config.data or default_calibration(manifest)
    on_step(f"data: {spec} ({config.calibration_size} calibration, {config.eval_size} held-out at most)")
    calib, held = datasets(spec, manifest, config)
    from enginekit.quant.data import describe_data, load_inputs

    second_name = config.second_data or second_spec(spec)
    second = load_inputs(second_name, manifest, purpose="evaluation", limit=config.eval_size, seed=2)
    if second.sha256 == held.sha256:
        raise InputError(f"the second held-out set ({second.source}) is the same as the first; give "
                         "--second-data a differently made set")
    calib_npy = run.work / "calibration.npy"
    np.save(calib_npy, calib.inputs)

    on_step(f"PyTorch eager fp32: reference outputs on {describe_data(held.source, held.size)} and "
            f"{describe_data(second.source, second.size)}")
    wrapper = _wrapper_class()(src.model, src.library).eval()
    references = [torch_outputs(wrapper, held.inputs), torch_outputs(wrapper, second.inputs)]
    return _Prepared(src, manifest, onnx_dir, spec, calib, held, second, second_name, calib_npy, references,
                     {0: onnx_dir})


def _token_merged(run: _RunSettings, prep: _Prepared, outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Phase 1b: for each ``--token-merge`` R, a merged export and every candidate that passed
    unmerged rebuilt from it (an export that fails is one failed outcome saying why)."""
    from enginekit.export.vit import ExportOptions, export_classifier

    passed = [oc.candidate for oc in outcomes if oc.status == "passed"]
    merged: list[Outcome] = []
    for r in run.config.token_merge:
        dest = run.work / f"onnx-tome{r}"
        run.on_step(f"export with {r} token pairs merged per block -> {dest}")
        variants = [Outcome(token_merged_candidate(c, r)) for c in passed]
        try:
            export_classifier(prep.src, dest, ExportOptions(seed=run.seed, token_merge=r), overwrite=True)
        except Exception as exc:  # the merged export failing leaves the unmerged candidates standing
            for oc in variants:
                oc.status, oc.reason = "failed", one_line(exc, with_type=True)
            merged += variants
            continue
        prep.onnx_dirs[r] = dest
        merged += variants
    _build_and_judge(run, prep, [oc for oc in merged if oc.status != "failed"])
    return merged


def _build_and_judge(run: _RunSettings, prep: _Prepared, outcomes: Sequence[Outcome]) -> None:
    """Phase 1: build and judge every candidate (minutes of quantizing and compiling)."""
    on_step = run.on_step
    built: dict[str, Path] = {}
    failed_bases: dict[str, str] = {}
    for i, oc in enumerate(outcomes, 1):
        cand = oc.candidate
        on_step(f"[{i}/{len(outcomes)}] {cand.name}: {cand.description}")
        if cand.base in failed_bases:
            oc.status, oc.reason = "failed", failed_bases[cand.base]
            continue
        start = time.perf_counter()
        try:
            oc.path = _build(cand, prep.onnx_dirs, run.work, built, prep.calib_npy, run.config, on_step)
            oc.build_s = time.perf_counter() - start
            judge(oc, prep.references, [prep.held, prep.second], prep.manifest.labels, run.config)
        except Exception as exc:  # one candidate's failure (any library's) must not end the run
            oc.status, oc.reason = "failed", one_line(exc, with_type=True)
            if cand.base not in built and cand.method is not None:
                failed_bases[cand.base] = oc.reason
            on_step(f"  failed: {oc.reason}")
            continue
        verdict = "passes" if oc.status == "passed" else f"rejected ({oc.reason})"
        on_step("  " + "; ".join(f"agreement {r['top1_agreement']:.4f}, cosine {r['logits_cosine']:.5f} on "
                                 f"{r['described']}" for r in oc.fidelity["sets"]) + f": {verdict}")


def _time_engines(run: _RunSettings, prep: _Prepared, outcomes: Sequence[Outcome]) -> _Timings:
    """Phase 2: time PyTorch, every engine that built, and PyTorch again, back to back, so
    the speed-ups are ratios measured side by side and any drift of the machine shows."""
    from enginekit.bench.harness import add_speedups, bench_artifact, bench_torch

    on_step, config, progress, manifest = run.on_step, run.config, run.progress, prep.manifest
    bench = config.bench_config()
    source_id = manifest.provenance.get("source")
    on_step(f"timing PyTorch eager fp32 and {sum(oc.path is not None for oc in outcomes)} engines at batch "
            f"{config.batch}")
    baseline = bench_torch(prep.src.model, manifest.component().inputs, bench, model_id=source_id,
                           progress=progress)[0]
    if prep.held.labels is not None and manifest.labels is not None:
        from enginekit.quant.gate import accuracy_of

        baseline["fidelity"]["accuracy"] = accuracy_of(prep.references[0]["logits"], prep.held.labels,
                                                       manifest.labels)
    for oc in outcomes:
        if oc.path is None or oc.status == "failed":
            continue
        try:
            rec = bench_artifact(oc.path, bench, backend=oc.candidate.backend, progress=progress)[0]
        except Exception as exc:  # an engine that judged fine but cannot be timed is a failure too
            oc.status, oc.reason = "failed", one_line(exc, with_type=True)
            continue
        rec["engine"]["name"] = oc.candidate.name
        rec["fidelity"] = {k: oc.fidelity[k] for k in ("top1_agreement", "logits_cosine", "logits_max_abs",
                                                        "accuracy", "reference", "budget") if k in oc.fidelity}
        rec["fidelity"]["data"] = oc.fidelity.get("inputs")
        oc.record = rec
        on_step(f"  {oc.candidate.name}: p50 {rec['latency_ms']['p50']:.2f} ms")
    after = bench_torch(prep.src.model, manifest.component().inputs, bench, model_id=source_id,
                        progress=progress)[0]
    drift = after["latency_ms"]["p50"] / baseline["latency_ms"]["p50"]
    on_step(f"PyTorch eager fp32: p50 {baseline['latency_ms']['p50']:.2f} ms before the engines, "
            f"{after['latency_ms']['p50']:.2f} ms after")
    if abs(drift - 1) > DRIFT_WARN:
        on_step(f"WARNING: the machine's speed moved during the run (PyTorch's p50 after the engines is {drift:.2f}x its p50 "
                "before them): read the speed-ups with care")

    before = baseline
    # Speed-ups divide by the faster of the two PyTorch timings, so a machine that slowed
    # down while the engines ran (a shared VM) cannot flatter them.
    baseline = min((before, after), key=lambda r: r["latency_ms"]["p50"])
    add_speedups([baseline, *[oc.record for oc in outcomes if oc.record is not None]])
    return _Timings(baseline, before, after, drift)


def _pick(outcomes: Sequence[Outcome]) -> Outcome | None:
    """The fastest candidate that passed (marked ``picked``); the other passes say what beat them."""
    passed = [oc for oc in outcomes if oc.status == "passed" and oc.record is not None]
    best = min(passed, key=lambda oc: oc.record["latency_ms"]["p50"]) if passed else None
    for oc in passed:
        if oc is best:
            oc.status, oc.reason = "picked", "fastest that keeps the budget"
        else:
            oc.reason = f"slower than {best.candidate.name}"
    return best


def _report(run: _RunSettings, prep: _Prepared, outcomes: Sequence[Outcome], times: _Timings,
            best: Outcome | None) -> dict[str, Any]:
    config, manifest = run.config, prep.manifest
    report = {
        "model": run.model,
        "source": {k: manifest.provenance.get(k) for k in ("source", "architecture", "weights", "seed")
                   if manifest.provenance.get(k) is not None},
        "output": str(run.out),
        "batch": config.batch,
        "budget": {"min_agreement": config.min_agreement, "min_cosine": config.min_cosine},
        "tie_margin": config.tie_margin,
        "data": {"spec": prep.spec, "calibration": prep.calib.record(), "held_out": prep.held.record(),
                 "second": {**prep.second.record(), "spec": prep.second_name}},
        "config": {k: v for k, v in asdict(config).items() if k not in ("min_agreement", "min_cosine")},
        "hardware": run.hw,
        "baseline": times.baseline,
        "baseline_before": {"latency_ms": times.before["latency_ms"]},
        "baseline_after": {"latency_ms": times.after["latency_ms"], "drift": times.drift},
        "candidates": [oc.to_dict() for oc in outcomes],
        "picked": best.candidate.name if best else None,
    }
    if best is not None:  # the enginekit commands that rebuild the pick by hand
        from enginekit.app.rebuild import rebuild_commands

        report["rebuild"] = rebuild_commands(report, asdict(best.candidate), seed=run.seed, revision=run.revision,
                                             group_size=_group_size(prep.onnx_dir, config.group_size))
    return report


def _write_pick(run: _RunSettings, report: dict[str, Any], markdown: str, best: Outcome, candidates: int) -> None:
    """Copy the pick to OUT atomically, its manifest saying where it came from, the report beside it."""
    from enginekit.artifact import atomic_artifact, write_manifest
    from enginekit.manifest import read_manifest

    run.on_step(f"picked {best.candidate.name} -> {run.out}")
    with atomic_artifact(run.out, overwrite=run.overwrite, inputs=(run.model,)) as tmp:
        shutil.copytree(best.path, tmp, dirs_exist_ok=True)
        picked = read_manifest(tmp)
        provenance = {**picked.provenance, "optimize": {
            "model": run.model, "candidate": best.candidate.name, "candidates": candidates,
            "baseline_p50_ms": report["baseline"]["latency_ms"]["p50"], "p50_ms": best.record["latency_ms"]["p50"],
            "speedup": best.record.get("speedup"), "batch": run.config.batch}}
        picked = picked.replace(fidelity=best.fidelity, provenance=provenance)
        write_manifest(tmp, picked)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (tmp / "report.md").write_text(markdown)


def _run(run: _RunSettings, candidates: list[Candidate]) -> dict[str, Any]:
    prep = _prepare(run)
    outcomes = [Outcome(c) for c in candidates]
    _build_and_judge(run, prep, outcomes)
    if run.config.token_merge:
        outcomes += _token_merged(run, prep, outcomes)
    times = _time_engines(run, prep, outcomes)
    best = _pick(outcomes)
    report = _report(run, prep, outcomes, times, best)
    markdown = render_report(report)
    if best is None:
        refuse_without_pick(run.work, run.out, report, markdown,
                            f"keeps the budget (top-1 agreement >= {run.config.min_agreement}, "
                            f"logits cosine >= {run.config.min_cosine}) against PyTorch",
                            [f"{oc.candidate.name}: {oc.status} ({oc.reason})" for oc in outcomes])
    _write_pick(run, report, markdown, best, len(outcomes))
    return report
