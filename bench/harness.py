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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from enginekit.bench.records import (FIDELITY_KEYS, PIPELINE_KEYS, RECORD_SCHEMA, add_speedups, engine_info,
                                     make_record)
from enginekit.bench.timing import (BenchConfig, _progress_bar, bench_runner, latency_stats, load_average, make_feeds,
                                    spread, time_callable)
from enginekit.bench.torch_baseline import (bench_torch, bench_torch_artifact, distinct_artifacts, distinct_sources,
                                            torch_baselines)
from enginekit.errors import ShapeError
from enginekit.hardware import fingerprint
from enginekit.manifest import Manifest, TensorSpec
from enginekit.registry import backend_class
from enginekit.runtimes.base import Runner

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
    "distinct_sources",
    "torch_baselines",
    "engine_info",
    "FIDELITY_KEYS",
    "PIPELINE_KEYS",
    "latency_stats",
    "load_average",
    "make_feeds",
    "make_record",
    "spread",
    "time_callable",
]



#: Where each backend's runner reads its thread count from ``manifest.target`` at load.
def threads_key(backend: str) -> str | None:
    """The manifest ``target`` key holding ``backend``'s thread count (the backend says)."""
    return backend_class(backend).threads_key


#: PyTorch's p50 after the engines over its p50 before them: beyond 1 ± this, the machine's
#: speed moved during the run and the speed-ups are flagged.
DRIFT_WARN = 0.15


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

