"""The bench harness: time a Runner, describe the engine, emit one record per batch size.

One record (a JSON object, :data:`RECORD_SCHEMA` 1) per (artifact, batch size)::

    {"schema": 1, "timestamp": ISO-8601 UTC, "hardware": fingerprint(), "hardware_id": str,
     "engine": {"artifact", "name", "kind", "backend", "device", "method", "precision", "manifest_sha256",
                "inference_precision"},
     "batch": int, "threads": int, "latency_ms": {p50, p90, p99, mean, min, max, count}, "runs": int,
     "throughput_ips": float, "load_ms": float|None, "first_inference_ms": float|None,
     "peak_rss_bytes": int|None, "size_bytes": int|None, "fidelity": {...}, "baseline": bool,
     "speedup": float|None, "model": str|None, "conditions": {...}}

``conditions`` says how the number was taken (every key optional): ``mode``
(latency: one request at a time; throughput: ``requests`` in flight),
``p99_over_p50`` (the spread of the timed runs), ``load_avg_start`` /
``load_avg_end`` (the machine's 1/5/15-minute load averages around the run),
``own_process`` (the engine ran alone in a fresh process, so ``peak_rss_bytes``
is its own; without it ``peak_rss_bytes`` is None), ``peak_rss_how`` (``vmhwm``:
the process's ``VmHWM``; ``sampled``: the largest RSS sampled, a lower bound, where
there is no ``/proc``; see :mod:`enginekit.bench.memory`) and, on PyTorch baseline
records, ``baseline_p50_ms`` (before and after the engines) and ``drift``.

``model`` names the source model (``provenance.source``); speed-ups are
ratios to the baseline of the same model, batch and hardware.

Cold start (``load_ms``, ``first_inference_ms``) is measured in this process
and kept apart from the warm latency. ``speedup`` is filled by
:func:`add_speedups` against a baseline record of the same batch and hardware.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from enginekit.runtimes.base import Runner

from enginekit.errors import ShapeError
from enginekit.hardware import fingerprint, fingerprint_id
from enginekit.manifest import Manifest, TensorSpec
from enginekit.registry import backend_class

__all__ = [
    "DRIFT_WARN",
    "RECORD_SCHEMA",
    "BenchConfig",
    "add_speedups",
    "bench_artifact",
    "bench_runner",
    "bench_torch",
    "bench_torch_artifact",
    "distinct_artifacts",
    "torch_baselines",
    "engine_info",
    "latency_stats",
    "load_average",
    "make_feeds",
    "make_record",
    "spread",
    "time_callable",
]

RECORD_SCHEMA = 1
#: Fidelity numbers copied from the manifest into each record (when present).
FIDELITY_KEYS = ("top1_agreement", "logits_cosine", "logits_max_abs", "accuracy")
#: What tells apart the records of one pipeline run (absent, None, on classifier records).
PIPELINE_KEYS = ("part", "height", "width", "steps")
#: Where each backend's runner reads its thread count from ``manifest.target`` at load.
def threads_key(backend: str) -> str | None:
    """The manifest ``target`` key holding ``backend``'s thread count (the backend says)."""
    return backend_class(backend).threads_key
#: PyTorch's p50 after the engines over its p50 before them: beyond 1 ± this, the machine's
#: speed moved during the run and the speed-ups are flagged.
DRIFT_WARN = 0.15


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (None where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def spread(stats: Mapping[str, float]) -> float | None:
    """p99 / p50 of a :func:`latency_stats` result: 1.0 is a steady run, 2 and more a noisy one."""
    p50, p99 = stats.get("p50"), stats.get("p99")
    return float(p99 / p50) if p50 and p99 is not None and p50 > 0 else None


@dataclass(frozen=True)
class BenchConfig:
    """What to time: a fixed number of runs OR a fixed duration, after ``warmup`` calls.

    ``threads`` 0 leaves the backend's default; ``seed`` seeds the random feeds.
    """

    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 10
    runs: int | None = 50
    duration_s: float | None = None
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.runs is None) == (self.duration_s is None):
            raise ValueError(
                "BenchConfig needs exactly one of runs (a fixed count) or duration_s (a fixed time); "
                f"got runs={self.runs!r}, duration_s={self.duration_s!r}; pass runs=None with duration_s"
            )
        if self.runs is not None and self.runs < 1:
            raise ValueError(f"BenchConfig.runs must be at least 1, got {self.runs}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"BenchConfig.duration_s must be positive, got {self.duration_s}")
        if self.warmup < 0 or self.threads < 0:
            raise ValueError(f"BenchConfig.warmup and threads must be at least 0, got {self.warmup}, {self.threads}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"BenchConfig.batch_sizes must be positive integers, got {self.batch_sizes!r}")


def latency_stats(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max in milliseconds (linear percentiles) and ``count`` of ``samples_s`` (seconds)."""
    if len(samples_s) == 0:
        raise ValueError("latency_stats needs at least one sample")
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99], method="linear"))
    return {"p50": p50, "p90": p90, "p99": p99, "mean": float(ms.mean()), "min": float(ms.min()),
            "max": float(ms.max()), "count": int(ms.size)}


def time_callable(fn: Callable[[], Any], config: BenchConfig,
                  on_progress: Callable[[int], None] | None = None) -> list[float]:
    """Call ``fn`` ``config.warmup`` times untimed, then time it (seconds, ``perf_counter``)
    ``config.runs`` times or until ``config.duration_s`` has passed (at least once).

    ``on_progress(i)`` is called after the i-th timed run (1-based), outside the timed window.
    """
    for _ in range(config.warmup):
        fn()
    samples: list[float] = []
    deadline = None if config.duration_s is None else time.perf_counter() + config.duration_s
    while True:
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        samples.append(end - start)
        if on_progress is not None:
            on_progress(len(samples))
        if deadline is None:
            if len(samples) >= (config.runs or 0):
                return samples
        elif end >= deadline:
            return samples


def _concrete_shape(spec: TensorSpec, batch: int) -> tuple[int, ...]:
    shape = []
    for axis, dim in enumerate(spec.shape):
        symbolic = not isinstance(dim, int) or dim < 0
        if axis == 0:
            if not symbolic and dim != batch:
                raise ShapeError(f"input {spec.name!r} has a fixed batch of {dim}; it cannot be benched at batch {batch}")
            shape.append(batch)
        elif symbolic:
            raise ShapeError(
                f"input {spec.name!r} has a symbolic dimension {dim!r} on axis {axis} (shape {tuple(spec.shape)}); "
                "the bench only fills a symbolic batch axis: export with a fixed size"
            )
        else:
            shape.append(dim)
    return tuple(shape)


def make_feeds(inputs: Sequence[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded feeds for ``inputs``: standard normal for float inputs, 0/1 for integer and bool ones."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = _concrete_shape(spec, batch)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def bench_runner(runner: Runner, batch: int, config: BenchConfig,
                 on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Time ``runner.run`` on a seeded feed at ``batch``: warm latency and throughput (images/s at p50)."""
    feeds = make_feeds(runner.inputs, batch, config.seed)
    samples = time_callable(lambda: runner.run(feeds), config, on_progress)
    stats = latency_stats(samples)
    return {"batch": int(batch), "latency_ms": stats, "throughput_ips": batch * 1000.0 / stats["p50"],
            "runs": len(samples)}


def _open(path: Path, device: str, backend: str | None, threads: int,
          mode: str = "latency") -> tuple[Runner, Manifest, str, int]:
    """``load_runner`` with ``threads`` set in the manifest target the runner reads at load
    (and, for ``mode="throughput"``, the backend's ``throughput_target``: on OpenVINO the
    THROUGHPUT performance hint, as benchmark_app uses by default: several streams, one per
    request in flight).

    Returns the runner, the manifest as on disk, the backend name and the thread
    count in effect (``threads``, else what a compiled artifact recorded, else 0).
    """
    from enginekit.api import default_backend, load_runner, resolve_device
    from enginekit.artifact import verify_artifact
    from enginekit.manifest import read_manifest
    from enginekit.registry import get_backend

    manifest = read_manifest(path)
    name = backend or default_backend(manifest)
    key = threads_key(name)
    recorded = int(manifest.target.get(key) or 0) if key else 0
    overrides: dict[str, Any] = {key: threads} if threads and key is not None else {}
    overrides.update(backend_class(name).throughput_target if mode == "throughput" else {})
    if not overrides:
        runner, manifest = load_runner(path, device, name)
        return runner, manifest, name, recorded
    verify_artifact(path, manifest)
    be = get_backend(name)
    if manifest.kind not in be.loads:  # let load_runner raise its own message
        load_runner(path, device, name)
    pinned = manifest.replace(target={**manifest.target, **overrides})
    return be.load(path, pinned, resolve_device(be, device)), manifest, name, threads or recorded


def _default_backend(path: Path) -> str:
    from enginekit.api import default_backend
    from enginekit.manifest import read_manifest

    return default_backend(read_manifest(path))


def engine_info(path: str | Path, manifest: Manifest, backend: str, device: str) -> dict[str, Any]:
    """The ``engine`` object of a record."""
    precisions = sorted({c.precision for c in manifest.components.values()})
    return {
        "artifact": str(path),
        "name": Path(path).name,
        "kind": manifest.kind,
        "backend": backend,
        "device": device,
        "method": (manifest.quantization or {}).get("method") or "float",
        "precision": precisions[0] if len(precisions) == 1 else ",".join(precisions),
        "manifest_sha256": manifest.digest(),
        # What the engine computes in where the backend records it (OpenVINO: f32, bf16, ...).
        "inference_precision": manifest.target.get("inference_precision_hint"),
    }


def make_record(
    *,
    engine: Mapping[str, Any],
    result: Mapping[str, Any],
    threads: int,
    hardware: Mapping[str, Any] | None = None,
    load_ms: float | None = None,
    first_inference_ms: float | None = None,
    peak_rss_bytes: int | None = None,
    size_bytes: int | None = None,
    fidelity: Mapping[str, Any] | None = None,
    baseline: bool = False,
    speedup: float | None = None,
    timestamp: str | None = None,
    model: str | None = None,
    conditions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One result record from a :func:`bench_runner` ``result`` and what is known about the engine.

    ``hardware`` defaults to this machine's :func:`fingerprint`.
    """
    hw = dict(hardware) if hardware is not None else fingerprint()
    return {
        "schema": RECORD_SCHEMA,
        "timestamp": timestamp or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hw,
        "hardware_id": fingerprint_id(hw),
        "engine": dict(engine),
        "batch": int(result["batch"]),
        "threads": int(threads),
        "latency_ms": dict(result["latency_ms"]),
        "runs": int(result["runs"]),
        "throughput_ips": float(result["throughput_ips"]),
        "load_ms": load_ms,
        "first_inference_ms": first_inference_ms,
        "peak_rss_bytes": peak_rss_bytes,
        "size_bytes": size_bytes,
        "fidelity": dict(fidelity or {}),
        "baseline": bool(baseline),
        "speedup": speedup,
        "model": model,
        "conditions": {"mode": "latency", "p99_over_p50": spread(result["latency_ms"]), **(conditions or {})},
    }


def _progress_bar(desc: str, total: int | None, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", leave=False, disable=not enabled, file=sys.stderr)


def bench_artifact(
    path: str | Path,
    config: BenchConfig,
    device: str = "cpu",
    backend: str | None = None,
    *,
    baseline: bool = False,
    progress: bool = True,
    own_process: bool = False,
    mode: str = "latency",
    requests: int = 0,
) -> list[dict[str, Any]]:
    """Load the artifact at ``path`` once and bench it at every ``config.batch_sizes``; one record each.

    Steps: 1. load (``load_ms``: ``load_runner`` wall time, hash checks and session
    creation included, with ``config.threads`` pinned); 2. the first inference at
    the first batch size (``first_inference_ms``, cold, before any warm-up);
    3. warm timing per batch size under a progress bar: one request at a time
    (``mode="latency"``, :func:`bench_runner`) or ``requests`` in flight
    (``mode="throughput"``, :func:`enginekit.bench.throughput.bench_throughput`);
    4. peak memory, only with ``own_process`` (the caller exec-ed this process for this
    artifact alone, :func:`enginekit.bench.session.bench_isolated`): the process's own
    high-water mark, :class:`~enginekit.bench.memory.PeakMemory` (``VmHWM``, else RSS
    sampled while it ran; never ``ru_maxrss``, which carries a parent's mark across
    fork and exec). In a shared process that mark counts whatever else the process
    holds (PyTorch, other engines), so ``peak_rss_bytes`` stays None.
    Cold-start fields are the same on every record of the artifact.
    """
    if mode not in ("latency", "throughput"):
        raise ValueError(f"bench mode must be latency or throughput, got {mode!r}")
    from enginekit.bench.memory import PeakMemory

    path = Path(path)
    hw = fingerprint()
    load_start = load_average()
    peak = PeakMemory() if own_process else None
    with peak or contextlib.nullcontext():
        timed = _time_artifact(path, config, device, backend, progress, mode, requests)
    manifest = timed.manifest

    size = sum(f.size for c in manifest.components.values() for f in c.files)
    fidelity = {k: manifest.fidelity[k] for k in FIDELITY_KEYS if k in manifest.fidelity}
    if "inputs" in manifest.fidelity:  # what data judged those numbers, and against what
        fidelity["data"] = manifest.fidelity["inputs"]
    for key in ("reference", "budget"):
        if key in manifest.fidelity:
            fidelity[key] = manifest.fidelity[key]
    conditions = {"mode": mode, "own_process": own_process, "load_avg_start": load_start,
                  "load_avg_end": load_average(), "torch_in_process": "torch" in sys.modules, **timed.extra}
    if peak is not None:
        conditions["peak_rss_how"] = peak.how
    return [
        make_record(engine=timed.engine, result=r, threads=timed.threads, hardware=hw, load_ms=timed.load_ms,
                    first_inference_ms=timed.first_ms, peak_rss_bytes=peak.bytes if peak is not None else None,
                    size_bytes=size, fidelity=fidelity, baseline=baseline, model=manifest.provenance.get("source"),
                    conditions=conditions)
        for r in timed.results
    ]


@dataclass(frozen=True)
class _Timed:
    """What steps 1-3 of :func:`bench_artifact` measured."""

    engine: dict[str, Any]
    results: list[dict[str, Any]]
    extra: dict[str, Any]  # throughput mode's conditions
    load_ms: float
    first_ms: float
    manifest: Manifest
    threads: int


def _time_artifact(path: Path, config: BenchConfig, device: str, backend: str | None, progress: bool, mode: str,
                   requests: int) -> _Timed:
    """Steps 1-3 of :func:`bench_artifact`: load, first inference, warm timing per batch size."""
    threads = config.threads
    if mode == "throughput" and not threads and backend_class(backend or _default_backend(path)).pool_per_engine:
        # N requests from N threads: split the cores between them rather than let each
        # session's pool take all of them (what ORT's own perf test does with -x).
        cores = psutil.cpu_count(logical=False) or 1
        threads = max(1, cores // (requests or cores))
    start = time.perf_counter()
    runner, manifest, name, threads = _open(path, device, backend, threads, mode)
    load_ms = (time.perf_counter() - start) * 1e3
    extra: dict[str, Any] = {}
    try:
        batches = _batches_for(runner.inputs, config.batch_sizes, path)
        first = make_feeds(runner.inputs, batches[0], config.seed)
        start = time.perf_counter()
        runner.run(first)
        first_ms = (time.perf_counter() - start) * 1e3
        results = []
        for batch in batches:
            with _progress_bar(f"{path.name} batch {batch}", config.runs, progress) as bar:
                if mode == "throughput":
                    from enginekit.bench.throughput import bench_throughput

                    result = bench_throughput(runner, batch, config, requests, on_progress=lambda _i: bar.update(1))
                    extra = {k: result.pop(k) for k in ("requests", "how") if k in result}
                    results.append(result)
                else:
                    results.append(bench_runner(runner, batch, config, on_progress=lambda _i: bar.update(1)))
        engine = engine_info(path, manifest, name, runner.device or device)
    finally:
        runner.close()
    return _Timed(engine, results, extra, load_ms, first_ms, manifest, threads)


def _batches_for(inputs: Sequence[TensorSpec], wanted: Sequence[int], path: Path) -> list[int]:
    """The batch sizes an engine can be benched at: all of ``wanted`` for a symbolic batch
    axis; for an engine built for a fixed batch, that one (the others are skipped with a
    note on stderr), or a ShapeError when it is not among ``wanted``."""
    dim = inputs[0].shape[0] if inputs and inputs[0].shape else None
    if not isinstance(dim, int) or dim < 0:
        return list(wanted)
    if dim not in wanted:
        raise ShapeError(f"{path}: built for a fixed batch of {dim}, not among the batch sizes asked for "
                         f"({', '.join(map(str, wanted))}); bench it with --batch {dim}")
    skipped = [b for b in wanted if b != dim]
    if skipped:
        print(f"{path}: built for a fixed batch of {dim}; skipping batch {', '.join(map(str, skipped))}",
              file=sys.stderr)
    return [dim]


def _any_batch(inputs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The specs with a symbolic batch axis: PyTorch runs any batch, whatever the engine was built for."""
    from dataclasses import replace

    return [replace(s, shape=("batch", *s.shape[1:])) if s.shape else s for s in inputs]


def bench_torch(
    model: Any,
    inputs: Sequence[TensorSpec],
    config: BenchConfig,
    *,
    model_id: str | None = None,
    name: str = "pytorch-eager",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """PyTorch eager fp32 of ``model`` through the same timer, feeds and statistics as
    :func:`bench_artifact`: one baseline record per batch size.

    Threads: ``config.threads`` (0: torch's default), set for the run and restored.
    ``load_ms`` and ``peak_rss_bytes`` stay None (building a PyTorch model is not a
    load from disk, and this process may hold more than the model: for a peak of its
    own, :func:`enginekit.bench.session.bench_torch_isolated`); ``size_bytes`` is
    the parameters' bytes.
    """
    import torch

    previous = torch.get_num_threads()
    threads = config.threads or previous
    torch.set_num_threads(threads)
    model = model.eval()
    hw = fingerprint()
    results = []
    first_ms: float | None = None
    try:
        with torch.inference_mode():
            for batch in config.batch_sizes:
                args = [torch.from_numpy(v) for v in make_feeds(_any_batch(inputs), batch, config.seed).values()]
                if first_ms is None:
                    start = time.perf_counter()
                    model(*args)
                    first_ms = (time.perf_counter() - start) * 1e3
                with _progress_bar(f"{name} batch {batch}", config.runs, progress) as bar:
                    samples = time_callable(lambda: model(*args), config,  # noqa: B023 - called before the loop moves on
                                            on_progress=lambda _i: bar.update(1))
                stats = latency_stats(samples)
                results.append({"batch": int(batch), "latency_ms": stats, "runs": len(samples),
                                "throughput_ips": batch * 1000.0 / stats["p50"]})
    finally:
        torch.set_num_threads(previous)
    engine = {"artifact": None, "name": name, "kind": "pytorch", "backend": "pytorch", "device": "cpu",
              "method": "float", "precision": "fp32", "manifest_sha256": None, "inference_precision": "f32"}
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return [
        make_record(engine=engine, result=r, threads=threads, hardware=hw, first_inference_ms=first_ms,
                    size_bytes=size, fidelity={"top1_agreement": 1.0, "logits_cosine": 1.0, "logits_max_abs": 0.0},
                    baseline=True, model=model_id)
        for r in results
    ]


def add_speedups(records: list[dict[str, Any]]) -> None:
    """Set ``speedup`` = baseline p50 / record p50 in place (for throughput-mode records:
    record frames/s / baseline frames/s), where a baseline record
    (``baseline`` true) of the same batch, ``hardware_id``, ``model`` and Ray node (when
    the records came from ``--ray``) exists (the last one wins). Pipeline records
    (:mod:`enginekit.bench.pipeline`) also match on ``part``, ``height``, ``width`` and ``steps``."""

    def key(rec: dict[str, Any]) -> tuple[Any, ...]:
        return (rec.get("hardware_id"), int(rec["batch"]), rec.get("model"), (rec.get("node") or {}).get("node_id"),
                *(rec.get(k) for k in PIPELINE_KEYS))

    base: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rec in records:
        if rec.get("baseline"):
            base[key(rec)] = rec
    for rec in records:
        ref = base.get(key(rec))
        if ref is None:
            continue
        if (rec.get("conditions") or {}).get("mode") == "throughput":
            # Frames per second with several requests in flight, over PyTorch's one at a time.
            ips, ref_ips = float(rec.get("throughput_ips") or 0), float(ref.get("throughput_ips") or 0)
            if ips > 0 and ref_ips > 0 and math.isfinite(ips):
                rec["speedup"] = ips / ref_ips
            continue
        p50, ref_p50 = float(rec["latency_ms"]["p50"]), float(ref["latency_ms"]["p50"])
        if p50 > 0 and math.isfinite(p50):
            rec["speedup"] = ref_p50 / p50


def distinct_artifacts(artifacts: Sequence[str | Path]) -> list[Path]:
    """The first artifact of each distinct source model among ``artifacts`` (same source,
    weights, seed and weights hash), each verified. Reads manifests only: no torch."""
    import json

    from enginekit.artifact import verify_artifact
    from enginekit.manifest import read_manifest

    distinct: dict[str, Path] = {}
    for path in artifacts:
        manifest = read_manifest(path)
        verify_artifact(path, manifest)
        key = json.dumps({k: manifest.provenance.get(k) for k in ("source", "weights", "seed", "weights_sha256")},
                         sort_keys=True, default=str)
        distinct.setdefault(key, Path(path))
    return list(distinct.values())


def distinct_sources(artifacts: Sequence[str | Path]) -> list[tuple[Manifest, Any]]:
    """(manifest, rebuilt source) per distinct source model among ``artifacts`` (:func:`distinct_artifacts`),
    rebuilt from its provenance (:func:`enginekit.export.sources.source_for_manifest`)."""
    from enginekit.export.sources import source_for_manifest
    from enginekit.manifest import read_manifest

    manifests = [read_manifest(path) for path in distinct_artifacts(artifacts)]
    return [(m, source_for_manifest(m.provenance)) for m in manifests]


def bench_torch_artifact(path: str | Path, config: BenchConfig, *, name: str = "pytorch-eager",
                         progress: bool = True, own_process: bool = False) -> list[dict[str, Any]]:
    """:func:`bench_torch` on the source model of the artifact at ``path``, rebuilt from its provenance.

    With ``own_process`` (the caller exec-ed this process for it,
    :func:`enginekit.bench.session.bench_torch_isolated`), ``peak_rss_bytes`` is the
    process's own peak (:class:`~enginekit.bench.memory.PeakMemory`: torch, the rebuilt
    model and its runs) and ``conditions`` say so, as on the engines' records.
    """
    from enginekit.bench.memory import PeakMemory
    from enginekit.export.sources import source_for_manifest
    from enginekit.manifest import read_manifest

    peak = PeakMemory() if own_process else None
    with peak or contextlib.nullcontext():
        manifest = read_manifest(path)
        src = source_for_manifest(manifest.provenance)
        records = bench_torch(src.model, manifest.component().inputs, config,
                              model_id=manifest.provenance.get("source"), name=name, progress=progress)
    for rec in records:
        rec["conditions"] = {**rec["conditions"], "own_process": own_process, "torch_in_process": True,
                             **({"peak_rss_how": peak.how} if peak is not None else {})}
        rec["peak_rss_bytes"] = peak.bytes if peak is not None else None
    return records


def torch_baselines(artifacts: Sequence[str | Path], config: BenchConfig, progress: bool = True) -> list[dict[str, Any]]:
    """:func:`bench_torch` once per distinct source model among ``artifacts`` (:func:`distinct_sources`)."""
    records: list[dict[str, Any]] = []
    for manifest, src in distinct_sources(artifacts):
        records += bench_torch(src.model, manifest.component().inputs, config,
                               model_id=manifest.provenance.get("source"), progress=progress)
    return records
