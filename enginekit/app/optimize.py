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
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.bench.harness import DRIFT_WARN, BenchConfig
from enginekit.errors import ArtifactError, FidelityError, InputError, one_line

__all__ = ["PRECISIONS", "Candidate", "OptimizeConfig", "optimize", "plan_candidates", "render_report", "second_spec"]

#: Precision families a user can ask for; "fp16" covers bf16 too.
PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class Candidate:
    """One engine to try: how to build it and what runs it."""

    name: str
    #: The backend that runs the engine.
    backend: str
    #: What the engine computes in: fp32, bf16, fp16, int8, int4 (weights for weight-only methods).
    precision: str
    #: The family it belongs to in :data:`PRECISIONS`.
    family: str
    #: ``quantize`` method and the backend it quantizes for; None for float engines.
    method: str | None = None
    quant_backend: str | None = None
    #: ``compile`` for ``backend`` with these extras after quantizing (None: run the result as it is).
    compile_extra: Mapping[str, Any] | None = None
    description: str = ""

    @property
    def base(self) -> str:
        """The quantized (or exported) artifact this candidate is built from; shared between variants."""
        return f"{self.quant_backend}-{self.method}" if self.method else "onnx"


@dataclass(frozen=True)
class OptimizeConfig:
    """What ``optimize`` tries and how it judges."""

    #: Backends to try (None: every installed one).
    backends: tuple[str, ...] | None = None
    precisions: tuple[str, ...] = PRECISIONS
    #: Batch size the engine is picked for; OpenVINO engines are compiled for it (static shape).
    batch: int = 1
    min_agreement: float = 0.99
    min_cosine: float = 0.999
    #: Data spec for calibration and held-out samples (None: builtin for the default model, else photos).
    data: str | None = None
    #: The second, differently made held-out set every candidate is also judged on
    #: (None: :func:`second_spec` of the calibration source). The budget holds on both.
    second_data: str | None = None
    calibration_size: int = 64
    eval_size: int = 128
    static_shape: bool = True
    warmup: int = 5
    runs: int | None = 30
    duration_s: float | None = None
    threads: int = 0
    #: int4 weight-only: weights per scale.
    group_size: int = 128
    #: Held-out samples whose reference top-2 logit gap is under ``tie_margin`` x the
    #: standard deviation of the reference logits are ties: no engine can be faulted
    #: for ranking them differently, so the agreement budget counts the other samples
    #: only. 0 (the default) counts every sample. Both agreements are reported.
    tie_margin: float = 0.0

    def bench_config(self) -> BenchConfig:
        return BenchConfig(batch_sizes=(self.batch,), warmup=self.warmup, runs=self.runs,
                           duration_s=self.duration_s, threads=self.threads)


def _bf16_capable(flags: Sequence[str]) -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & set(flags))


def plan_candidates(backends: Sequence[str], precisions: Sequence[str], batch: int, *,
                    static_shape: bool = True, cpu_flags: Sequence[str] = ()) -> list[Candidate]:
    """The candidates for ``backends`` × ``precisions`` on a CPU with ``cpu_flags``.

    ONNX Runtime runs its own quantized graphs; OpenVINO runs NNCF's IR and the
    TensorRT-ready QDQ graph (symmetric int8, which its CPU plugin executes as
    int8), each compiled for a static batch when ``static_shape``. bf16 variants
    appear only where the CPU computes in bf16 (AMX or AVX512-BF16).
    """
    ov_static = {"static_batch": batch} if static_shape else {}
    bf16 = _bf16_capable(cpu_flags)
    out: list[Candidate] = []
    if "onnxruntime" in backends:
        out += [
            Candidate("onnxruntime-fp32", "onnxruntime", "fp32", "fp32", compile_extra={},
                      description="float graph, ONNX Runtime offline optimizations"),
            Candidate("onnxruntime-fp16", "onnxruntime", "fp16", "fp16", "fp16", "onnxruntime",
                      description="fp16 weights and compute, float32 inputs and outputs"),
            Candidate("onnxruntime-int8-dynamic", "onnxruntime", "int8", "int8", "int8-dynamic", "onnxruntime",
                      description="int8 weights, activations quantized on the fly"),
            Candidate("onnxruntime-int8-static", "onnxruntime", "int8", "int8", "int8-static", "onnxruntime",
                      description="int8 QDQ, calibrated"),
            Candidate("onnxruntime-int4-weight", "onnxruntime", "int4", "int4", "int4-weight", "onnxruntime",
                      description="int4 MatMulNBits weights"),
        ]
    if "openvino" in backends:
        out.append(Candidate("openvino-fp32", "openvino", "fp32", "fp32",
                             compile_extra={**ov_static, "inference_precision": "f32"},
                             description="float IR, f32 inference"))
        if bf16:
            out.append(Candidate("openvino-bf16", "openvino", "bf16", "fp16",
                                 compile_extra={**ov_static, "inference_precision": "bf16"},
                                 description="float IR, bf16 inference (AMX/AVX512-BF16)"))
        out.append(Candidate("openvino-fp16", "openvino", "fp16", "fp16", "fp16", "openvino",
                             compile_extra={**ov_static}, description="NNCF fp16 weights, device's precision"))
        for method, precision, desc in (("int8-static", "int8", "NNCF int8 post-training quantization"),
                                        ("int8-weight", "int8", "NNCF int8 weights, float activations"),
                                        ("int4-weight", "int4", "NNCF int4 weights")):
            out.append(Candidate(f"openvino-{method}", "openvino", precision, precision, method, "openvino",
                                 compile_extra={**ov_static, "inference_precision": "f32"},
                                 description=f"{desc}, f32 elsewhere"))
            if bf16 and method == "int8-static":
                out.append(Candidate(f"openvino-{method}-bf16", "openvino", precision, precision, method, "openvino",
                                     compile_extra={**ov_static, "inference_precision": "bf16"},
                                     description=f"{desc}, bf16 elsewhere"))
        out.append(Candidate("openvino-int8-qdq", "openvino", "int8", "int8", "int8-qdq", "tensorrt",
                             compile_extra={**ov_static, "inference_precision": "f32"},
                             description="symmetric int8 QDQ graph (TensorRT-ready), f32 elsewhere"))
        if bf16:
            out.append(Candidate("openvino-int8-qdq-bf16", "openvino", "int8", "int8", "int8-qdq", "tensorrt",
                                 compile_extra={**ov_static, "inference_precision": "bf16"},
                                 description="symmetric int8 QDQ graph (TensorRT-ready), bf16 elsewhere"))
    return [c for c in out if c.family in precisions]


# --------------------------------------------------------------------------- the run


@dataclass
class _Outcome:
    candidate: Candidate
    status: str = "pending"  # picked | passed | rejected | failed
    reason: str = ""
    path: Path | None = None
    build_s: float | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": asdict(self.candidate), "status": self.status, "reason": self.reason,
                "build_s": self.build_s, "fidelity": self.fidelity, "record": self.record}


def _datasets(spec: str, manifest: Any, config: OptimizeConfig) -> tuple[Any, Any]:
    from enginekit.quant.data import load_inputs, split_every

    if spec in ("builtin", "photos", "synthetic", "patterns"):
        calib = load_inputs(spec, manifest, purpose="calibration", limit=config.calibration_size,
                            allow_synthetic=spec == "synthetic")
        held = load_inputs(spec, manifest, purpose="evaluation", limit=config.eval_size, seed=1)
        return calib, held
    calib, held = split_every(load_inputs(spec, manifest, purpose="calibration"))
    return (calib.take(range(min(config.calibration_size, calib.size))),
            held.take(range(min(config.eval_size, held.size))))


def _torch_outputs(wrapper: Any, x: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    import torch

    parts: dict[str, list[np.ndarray]] = {"logits": [], "embedding": []}
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            logits, emb = wrapper(torch.from_numpy(x[start : start + batch]))
            parts["logits"].append(logits.float().numpy())
            parts["embedding"].append(emb.float().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def _group_size(onnx_dir: Path, wanted: int) -> int:
    """``wanted`` halved until it divides the model's width (a ViT's linear layers all take
    multiples of it), so int4 works on narrow models too."""
    from enginekit.manifest import read_manifest

    dim = int(read_manifest(onnx_dir).extra.get("embedding_dim") or wanted)
    size = wanted
    while size > 1 and dim % size:
        size //= 2
    return size


def _build(cand: Candidate, onnx_dir: Path, work: Path, built: dict[str, Path], calib_npy: Path | None,
           config: OptimizeConfig, on_step: Callable[[str], None]) -> Path:
    from enginekit.api import compile_artifact
    from enginekit.quant.api import quantize_artifact
    from enginekit.quant.base import QuantOptions
    from enginekit.runtimes.base import CompileOptions

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


def second_spec(spec: str) -> str:
    """The second, differently made held-out set for a calibration source ``spec``: procedural
    ``patterns`` beside photo crops, digits or noise; real ``photos`` (where scikit-learn is
    installed) beside ``patterns`` or the user's own folder or array."""
    from enginekit.quant.data import photos_available

    if spec in ("photos", "builtin", "synthetic"):
        return "patterns"
    return "photos" if photos_available() else "patterns"


def _judge_set(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], data: Any, labels: Any,
               config: OptimizeConfig) -> tuple[dict[str, Any], float]:
    """The comparison on one held-out set, and the agreement the budget counts there."""
    from enginekit.quant.gate import measure

    report = measure(reference, outputs, data, labels)
    judged = report["top1_agreement"]
    if config.tie_margin > 0:
        ref = reference["logits"]
        top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
        decided = (top2[:, 1] - top2[:, 0]) >= config.tie_margin * float(ref.std())
        same = outputs["logits"].argmax(1) == ref.argmax(1)
        report.update(tie_margin=config.tie_margin, ties=int((~decided).sum()),
                      top1_agreement_decided=float(same[decided].mean()) if decided.any() else 1.0)
        judged = report["top1_agreement_decided"]
    return report, judged


def _judge(outcome: _Outcome, references: Sequence[dict[str, np.ndarray]], sets: Sequence[Any], labels: Any,
           config: OptimizeConfig) -> None:
    """Measure the candidate against PyTorch on every held-out set; the budget holds when it
    holds on the worst of them. The top-level numbers are the worst set's."""
    from enginekit.api import load_runner
    from enginekit.quant.data import describe_data
    from enginekit.quant.gate import Budget, misses, run_all

    runner, _ = load_runner(outcome.path, device="cpu", backend=outcome.candidate.backend)
    with runner:
        outputs = [run_all(runner, data) for data in sets]
    per_set = [_judge_set(out, ref, data, labels, config) for out, ref, data in zip(outputs, references, sets)]
    budget = Budget(config.min_agreement, config.min_cosine)
    worst_agree = min(range(len(sets)), key=lambda i: per_set[i][1])
    worst_cos = min(range(len(sets)), key=lambda i: per_set[i][0]["logits_cosine"])
    first = per_set[0][0]
    report: dict[str, Any] = {
        "reference": "pytorch eager fp32",
        "inputs": " + ".join(d.source for d in sets),
        "samples": sum(d.size for d in sets),
        "top1_agreement": min(r["top1_agreement"] for r, _ in per_set),
        "logits_cosine": per_set[worst_cos][0]["logits_cosine"],
        "logits_max_abs": max(r["logits_max_abs"] for r, _ in per_set),
        "sets": [{"role": "held-out from the calibration source" if i == 0 else "second set, made differently",
                  "described": describe_data(d.source, d.size), **r} for i, (d, (r, _)) in enumerate(zip(sets,
                                                                                                           per_set))],
        "judged_on": {"agreement": sets[worst_agree].source, "cosine": sets[worst_cos].source},
    }
    for key in ("accuracy", "reference_accuracy"):
        if key in first:
            report[key] = first[key]
    if config.tie_margin > 0:
        report.update(tie_margin=config.tie_margin, ties=sum(r["ties"] for r, _ in per_set),
                      top1_agreement_decided=per_set[worst_agree][1])
    outcome.fidelity = {**report, "budget": budget.to_dict()}
    judged = {**report, "top1_agreement": per_set[worst_agree][1]}
    missed = []
    for m in misses(judged, budget):
        where = sets[worst_agree if "agreement" in m else worst_cos]
        m = m.replace("top-1 agreement", "top-1 agreement on decided samples") if config.tie_margin > 0 else m
        missed.append(f"{m} on {describe_data(where.source, where.size)}")
    outcome.status, outcome.reason = ("rejected", "; ".join(missed)) if missed else ("passed", "")


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

    out.parent.mkdir(parents=True, exist_ok=True)
    keep = work_dir is not None
    work = Path(work_dir) if keep else Path(tempfile.mkdtemp(prefix=f".{out.name}.optimize-", dir=out.parent))
    work.mkdir(parents=True, exist_ok=True)
    # The candidates' compiled blobs go to a model cache inside the work folder and leave
    # with it (a dozen blobs of a large model would otherwise pile up in the user's cache);
    # only the pick is compiled into this machine's cache, below.
    from enginekit.api import warm_cache
    from enginekit.artifact import using_cache_root

    try:
        with using_cache_root(work / "model-cache"):
            report = _run(model, out, work, candidates, config, hw, random_weights=random_weights, weights=weights,
                          revision=revision, seed=seed, overwrite=overwrite, progress=progress, on_step=on_step)
    except FidelityError:
        keep = True  # the report of why nothing passed lives there
        raise
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    warm_cache(out, "cpu")
    return report


def _run(model: str, out: Path, work: Path, candidates: list[Candidate], config: OptimizeConfig,
         hw: dict[str, Any], *, random_weights: bool, weights: str | Path | None, revision: str | None, seed: int,
         overwrite: bool, progress: bool, on_step: Callable[[str], None]) -> dict[str, Any]:
    from enginekit.artifact import atomic_artifact, write_manifest
    from enginekit.bench.harness import add_speedups, bench_artifact, bench_torch
    from enginekit.export.sources import resolve_source
    from enginekit.export.vit import ExportOptions, _wrapper_class, export_classifier
    from enginekit.manifest import read_manifest

    on_step(f"loading {model}")
    src = resolve_source(model, random_weights=random_weights, seed=seed, weights=weights, revision=revision)
    onnx_dir = work / "onnx"
    on_step(f"export -> {onnx_dir}")
    manifest = export_classifier(src, onnx_dir, ExportOptions(seed=seed), overwrite=True)

    from enginekit.quant.api import default_calibration

    spec = config.data or default_calibration(manifest)
    on_step(f"data: {spec} ({config.calibration_size} calibration, {config.eval_size} held-out at most)")
    calib, held = _datasets(spec, manifest, config)
    from enginekit.quant.data import describe_data, load_inputs

    second_name = config.second_data or second_spec(spec)
    second = load_inputs(second_name, manifest, purpose="evaluation", limit=config.eval_size, seed=2)
    if second.sha256 == held.sha256:
        raise InputError(f"the second held-out set ({second.source}) is the same as the first; give "
                         "--second-data a differently made set")
    calib_npy = work / "calibration.npy"
    np.save(calib_npy, calib.inputs)

    on_step(f"PyTorch eager fp32: reference outputs on {describe_data(held.source, held.size)} and "
            f"{describe_data(second.source, second.size)}")
    wrapper = _wrapper_class()(src.model, src.library).eval()
    references = [_torch_outputs(wrapper, held.inputs), _torch_outputs(wrapper, second.inputs)]
    reference = references[0]
    outcomes = [_Outcome(c) for c in candidates]
    built: dict[str, Path] = {}
    failed_bases: dict[str, str] = {}
    # Phase 1: build and judge every candidate (minutes of quantizing and compiling).
    for i, oc in enumerate(outcomes, 1):
        cand = oc.candidate
        on_step(f"[{i}/{len(outcomes)}] {cand.name}: {cand.description}")
        if cand.base in failed_bases:
            oc.status, oc.reason = "failed", failed_bases[cand.base]
            continue
        start = time.perf_counter()
        try:
            oc.path = _build(cand, onnx_dir, work, built, calib_npy, config, on_step)
            oc.build_s = time.perf_counter() - start
            _judge(oc, references, [held, second], manifest.labels, config)
        except Exception as exc:  # one candidate's failure (any library's) must not end the run
            oc.status, oc.reason = "failed", one_line(exc, with_type=True)
            if cand.base not in built and cand.method is not None:
                failed_bases[cand.base] = oc.reason
            on_step(f"  failed: {oc.reason}")
            continue
        verdict = "passes" if oc.status == "passed" else f"rejected ({oc.reason})"
        on_step("  " + "; ".join(f"agreement {r['top1_agreement']:.4f}, cosine {r['logits_cosine']:.5f} on "
                                 f"{r['described']}" for r in oc.fidelity["sets"]) + f": {verdict}")

    # Phase 2: time PyTorch, every engine that built, and PyTorch again, back to back, so
    # the speed-ups are ratios measured side by side and any drift of the machine shows.
    bench = config.bench_config()
    source_id = manifest.provenance.get("source")
    on_step(f"timing PyTorch eager fp32 and {sum(oc.path is not None for oc in outcomes)} engines at batch "
            f"{config.batch}")
    baseline = bench_torch(src.model, manifest.component().inputs, bench, model_id=source_id, progress=progress)[0]
    if held.labels is not None and manifest.labels is not None:
        from enginekit.quant.gate import accuracy_of

        baseline["fidelity"]["accuracy"] = accuracy_of(reference["logits"], held.labels, manifest.labels)
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
    after = bench_torch(src.model, manifest.component().inputs, bench, model_id=source_id, progress=progress)[0]
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
    passed = [oc for oc in outcomes if oc.status == "passed" and oc.record is not None]
    best = min(passed, key=lambda oc: oc.record["latency_ms"]["p50"]) if passed else None
    for oc in passed:
        if oc is best:
            oc.status, oc.reason = "picked", "fastest that keeps the budget"
        else:
            oc.reason = f"slower than {best.candidate.name}"
    report = {
        "model": model,
        "source": {k: manifest.provenance.get(k) for k in ("source", "architecture", "weights", "seed")
                   if manifest.provenance.get(k) is not None},
        "output": str(out),
        "batch": config.batch,
        "budget": {"min_agreement": config.min_agreement, "min_cosine": config.min_cosine},
        "tie_margin": config.tie_margin,
        "data": {"spec": spec, "calibration": calib.record(), "held_out": held.record(),
                 "second": {**second.record(), "spec": second_name}},
        "config": {k: v for k, v in asdict(config).items() if k not in ("min_agreement", "min_cosine")},
        "hardware": hw,
        "baseline": baseline,
        "baseline_before": {"latency_ms": before["latency_ms"]},
        "baseline_after": {"latency_ms": after["latency_ms"], "drift": drift},
        "candidates": [oc.to_dict() for oc in outcomes],
        "picked": best.candidate.name if best else None,
    }
    if best is not None:  # the enginekit commands that rebuild the pick by hand
        from enginekit.app.rebuild import rebuild_commands

        report["rebuild"] = rebuild_commands(report, asdict(best.candidate), seed=seed, revision=revision,
                                             group_size=_group_size(onnx_dir, config.group_size))
    markdown = render_report(report)
    if best is None:
        (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (work / "report.md").write_text(markdown)
        lines = "\n".join(f"  {oc.candidate.name}: {oc.status} ({oc.reason})" for oc in outcomes)
        raise FidelityError(f"no candidate keeps the budget (top-1 agreement >= {config.min_agreement}, "
                            f"logits cosine >= {config.min_cosine}) against PyTorch:\n{lines}\n"
                            f"nothing was written to {out}; the report is in {work / 'report.md'}")

    on_step(f"picked {best.candidate.name} -> {out}")
    with atomic_artifact(out, overwrite=overwrite, inputs=(model,)) as tmp:
        shutil.copytree(best.path, tmp, dirs_exist_ok=True)
        picked = read_manifest(tmp)
        provenance = {**picked.provenance, "optimize": {
            "model": model, "candidate": best.candidate.name, "candidates": len(outcomes),
            "baseline_p50_ms": baseline["latency_ms"]["p50"], "p50_ms": best.record["latency_ms"]["p50"],
            "speedup": best.record.get("speedup"), "batch": config.batch}}
        picked = picked.replace(fidelity=best.fidelity, provenance=provenance)
        write_manifest(tmp, picked)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (tmp / "report.md").write_text(markdown)
    return report


# --------------------------------------------------------------------------- the report

_FATE = {"picked": "**picked**", "passed": "passed", "rejected": "rejected", "failed": "failed"}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _per_set(fid: Mapping[str, Any], key: str, spec: str) -> str:
    """``key`` on each held-out set ("0.9922 / 0.8400"), or the single number of an older report."""
    sets = fid.get("sets")
    if sets:
        return " / ".join(_fmt(s.get(key), spec) for s in sets)
    return _fmt(fid.get(key), spec)


def render_report(report: Mapping[str, Any]) -> str:
    """The markdown report: the budget, the baseline, and one row per candidate with its fate."""
    hw = report["hardware"]
    base = report["baseline"]
    after = report["baseline_after"]
    before = report.get("baseline_before", base)
    budget = report["budget"]
    lines = [
        f"# enginekit optimize: {report['model']}",
        "",
        f"- machine: {hw.get('cpu_model')}, {hw.get('logical_cores')} logical cores, "
        f"flags {', '.join(hw.get('flags') or []) or 'none'}",
        f"- batch {report['batch']}; budget against PyTorch eager fp32: top-1 agreement >= {budget['min_agreement']}, "
        f"logits cosine >= {budget['min_cosine']}",
        f"- held-out data: {report['data']['held_out']['source']} ({report['data']['held_out']['size']} samples); "
        f"calibration: {report['data']['calibration']['source']} ({report['data']['calibration']['size']} samples)",
        *([f"- second held-out set, made differently: {report['data']['second']['source']} "
           f"({report['data']['second']['size']} samples); every candidate is judged on both sets and the "
           "budget holds on the worse (agreement and cosine columns: held-out / second)"]
          if report["data"].get("second") else []),
        f"- baseline: PyTorch eager fp32 ({base['threads']} threads), p50 {before['latency_ms']['p50']:.2f} ms "
        f"timed before the engines and {after['latency_ms']['p50']:.2f} ms after them; speed-ups divide by the "
        f"faster, {base['latency_ms']['p50']:.2f} ms"
        + (" (**the machine's speed moved during the run: read the speed-ups with care**)"
           if abs(after["drift"] - 1) > DRIFT_WARN else ""),
        *([f"- ties: held-out samples whose PyTorch top-2 logit gap is under {report['tie_margin']} x the "
           "logits' standard deviation; the agreement budget counts the other (decided) samples only"]
          if report.get("tie_margin") else []),
        f"- picked: **{report['picked'] or 'none'}**",
        "",
        "| candidate | backend | precision | p50 ms | p90 ms | speed-up | agreement | cosine | accuracy | "
        "size MB | build s | fate |",
        "|:---|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
        f"| pytorch eager (baseline) | pytorch | fp32 | {base['latency_ms']['p50']:.2f} | "
        f"{base['latency_ms']['p90']:.2f} | 1.00x | 1.0000 | 1.00000 | {_fmt(base['fidelity'].get('accuracy'), '.4f')} | "
        f"{(base['size_bytes'] or 0) / 1e6:.1f} | - | "
        "reference |",
    ]
    for oc in report["candidates"]:
        c, rec, fid = oc["candidate"], oc["record"] or {}, oc["fidelity"]
        lat = rec.get("latency_ms") or {}
        speed = rec.get("speedup")
        fate = _FATE.get(oc["status"], oc["status"]) + (f": {oc['reason']}" if oc["reason"] else "")
        lines.append(
            f"| {c['name']} | {c['backend']} | {c['precision']} | {_fmt(lat.get('p50'), '.2f')} | "
            f"{_fmt(lat.get('p90'), '.2f')} | {_fmt(speed, '.2f') + 'x' if speed else '-'} | "
            f"{_per_set(fid, 'top1_agreement', '.4f')}"
            + (f" ({fid['top1_agreement_decided']:.4f} decided)" if "top1_agreement_decided" in fid else "")
            + f" | {_per_set(fid, 'logits_cosine', '.5f')} | "
            f"{_fmt(fid.get('accuracy'), '.4f')} | {_fmt((rec.get('size_bytes') or 0) / 1e6 if rec else None, '.1f')} | "
            f"{_fmt(oc['build_s'], '.0f')} | {fate.replace('|', '/')} |"
        )
    lines += ["", "Latency is warm p50 at the batch above, timed in one run with the baseline; agreement and "
              "cosine are against PyTorch's outputs on each held-out set (never calibrated on).", ""]
    if report.get("rebuild"):
        lines += [f"Rebuild {report['picked']} by hand:", "", "```sh", *report["rebuild"], "```", ""]
    return "\n".join(lines)

