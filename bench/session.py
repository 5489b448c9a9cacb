"""One ``enginekit bench`` run of classifier artifacts, taken so its numbers can be trusted.

1. the machine's load average is read (it goes into every record's ``conditions``);
2. with the PyTorch baseline, PyTorch eager fp32 of each distinct source model is
   timed **before** the engines, in a fresh process per model;
3. each artifact is timed in a **fresh process** of its own (``python -m
   enginekit.bench.session``, exec-ed, never forked), so its ``peak_rss_bytes`` is
   the engine's own ``VmHWM`` (:mod:`enginekit.bench.memory`), not the parent's: a
   child's ``ru_maxrss`` would carry the parent's high-water mark;
4. PyTorch is timed again **after** the engines; each baseline record is the faster
   of the two (a machine that slowed down meanwhile cannot flatter the engines), with
   both p50s and their ratio (``drift``) in its ``conditions``;
5. :func:`run_notes` turns the conditions into lines for the user: how the baseline
   was taken, a warning when PyTorch's speed moved by more than
   :data:`~enginekit.bench.harness.DRIFT_WARN` between the two timings, the load
   average, and engines whose p99 is far above their p50.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from enginekit.bench.harness import (
    DRIFT_WARN,
    BenchConfig,
    add_speedups,
    bench_artifact,
    bench_torch,
    bench_torch_artifact,
    distinct_artifacts,
    distinct_sources,
    load_average,
)
from enginekit import errors

__all__ = ["SPREAD_WARN", "bench_classifiers", "bench_isolated", "bench_torch_isolated", "run_notes"]

#: p99 / p50 above this marks an engine's timing as noisy in the notes.
SPREAD_WARN = 2.0


def bench_isolated(path: str | Path, config: BenchConfig, device: str = "cpu", backend: str | None = None, *,
                   mode: str = "latency", requests: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """:func:`~enginekit.bench.harness.bench_artifact` in a fresh Python process of its own.

    The child inherits the environment (cache folder, threads) and stderr (progress
    bars, notes); its records come back through a file. An enginekit error in the
    child is raised here as the same type with the same message.
    """
    return _spawn({"kind": "engine", "path": str(path), "config": asdict(config), "device": device,
                   "backend": backend, "mode": mode, "requests": requests, "progress": progress})


def bench_torch_isolated(path: str | Path, config: BenchConfig, *, name: str = "pytorch-eager",
                         progress: bool = True) -> list[dict[str, Any]]:
    """:func:`~enginekit.bench.harness.bench_torch_artifact` (PyTorch eager of the source model of
    the artifact at ``path``) in a fresh Python process of its own, so its peak memory is
    PyTorch's own (torch, the model, its runs) and the parent never imports torch."""
    return _spawn({"kind": "torch", "path": str(path), "config": asdict(config), "name": name,
                   "progress": progress})


def _spawn(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``job`` in ``python -m enginekit.bench.session`` (exec-ed: its memory counts start at
    zero); the child's records, or its enginekit error raised here."""
    path = job["path"]
    with tempfile.TemporaryDirectory(prefix="enginekit-bench-") as tmp:
        spec, out = Path(tmp) / "job.json", Path(tmp) / "records.json"
        spec.write_text(json.dumps(job))
        proc = subprocess.Popen([sys.executable, "-m", "enginekit.bench.session", str(spec), str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
        assert proc.stderr is not None
        # Relay the child's stderr (progress bars, notes) as it comes, to whatever sys.stderr is now.
        while chunk := proc.stderr.read1(65536):
            sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
        proc.wait()
        result = json.loads(out.read_text()) if out.is_file() else None
    if result is None:
        raise errors.BackendError(f"{path}: the bench process ended with exit status {proc.returncode} "
                                  "before it wrote any record (out of memory?)")
    if "error" in result:
        cls = getattr(errors, result["type"], errors.EngineKitError)
        cls = cls if isinstance(cls, type) and issubclass(cls, errors.EngineKitError) else errors.EngineKitError
        raise cls(result["error"])
    return result["records"]


def _child(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    cfg = job["config"]
    config = BenchConfig(**{**cfg, "batch_sizes": tuple(cfg["batch_sizes"])})
    try:
        if job.get("kind") == "torch":
            records = bench_torch_artifact(job["path"], config, name=job["name"], progress=job["progress"],
                                           own_process=True)
        else:
            records = bench_artifact(job["path"], config, job["device"], job["backend"], progress=job["progress"],
                                     own_process=True, mode=job["mode"], requests=job["requests"])
        result: dict[str, Any] = {"records": records}
    except errors.EngineKitError as exc:
        result = {"error": str(exc), "type": type(exc).__name__}
    except ValueError as exc:  # a bad option that got this far
        result = {"error": str(exc), "type": "InputError"}
    Path(out_path).write_text(json.dumps(result, default=str))
    return 0


def bench_classifiers(artifacts: Sequence[str | Path], config: BenchConfig, device: str = "cpu", *,
                      baseline: bool = False, mode: str = "latency", requests: int = 0,
                      isolate: bool = True, progress: bool = True) -> list[dict[str, Any]]:
    """Time every artifact (each in its own process unless ``isolate`` is off), between two
    PyTorch timings when ``baseline`` (each in its own process too, unless ``isolate`` is
    off); speed-ups filled. See the module docstring."""
    start_load = load_average()
    if not baseline:
        sources: list[Any] = []
    elif isolate:
        sources = distinct_artifacts(artifacts)
    else:
        sources = distinct_sources(artifacts)

    def torch_side(label: str) -> list[list[dict[str, Any]]]:
        name = f"pytorch-eager ({label})"
        if isolate:
            return [bench_torch_isolated(path, config, name=name, progress=progress) for path in sources]
        return [bench_torch(src.model, m.component().inputs, config, model_id=m.provenance.get("source"),
                            name=name, progress=progress) for m, src in sources]

    before = torch_side("before") if baseline else []
    engines: list[dict[str, Any]] = []
    for path in artifacts:
        if isolate:
            engines += bench_isolated(path, config, device, mode=mode, requests=requests, progress=progress)
        else:
            engines += bench_artifact(path, config, device, progress=progress, mode=mode, requests=requests)
    after = torch_side("after") if baseline else []
    end_load = load_average()

    records: list[dict[str, Any]] = []
    for first_recs, second_recs in zip(before, after):
        for first, second in zip(first_recs, second_recs):
            best = dict(min(first, second, key=lambda r: r["latency_ms"]["p50"]))
            b, a = first["latency_ms"]["p50"], second["latency_ms"]["p50"]
            best["engine"] = {**best["engine"], "name": "pytorch-eager"}
            best["conditions"] = {**best["conditions"], "baseline_p50_ms": {"before": b, "after": a},
                                  "drift": a / b if b > 0 else None}
            records.append(best)
    for rec in records + engines:
        rec["conditions"] = {**rec["conditions"], "run_load_avg_start": start_load, "run_load_avg_end": end_load}
    records += engines
    add_speedups(records)
    return records


def run_notes(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines for the user on how a classifier run's numbers were taken and where to doubt them."""
    notes: list[str] = []
    bases = [r for r in records if r.get("baseline") and "baseline_p50_ms" in (r.get("conditions") or {})
             and r.get("part") is None]
    moved = False
    for b in bases:
        c = b["conditions"]
        p = c["baseline_p50_ms"]
        notes.append(f"PyTorch eager fp32 ({b['threads']} threads, batch {b['batch']}) was timed before and after "
                     f"the engines: p50 {p['before']:.2f} ms before, {p['after']:.2f} ms after; speed-ups divide "
                     "by the faster")
        if c.get("drift") is not None and abs(c["drift"] - 1) > DRIFT_WARN:
            moved = True
    if moved:
        notes.append(f"WARNING: the machine's speed moved during the run (PyTorch's p50 changed by more than "
                     f"{DRIFT_WARN:.0%} between before and after): read the speed-ups with care, or rerun on a "
                     "quiet machine")
    conds = [r.get("conditions") or {} for r in records]
    start = next((c.get("run_load_avg_start") for c in conds if c.get("run_load_avg_start")), None)
    end = next((c.get("run_load_avg_end") for c in conds if c.get("run_load_avg_end")), None)
    if start and end:
        cores = os.cpu_count() or 1
        busy = max(start[0], end[0]) > 0.5 * cores
        notes.append(f"load average (1/5/15 min): {' '.join(f'{v:.2f}' for v in start)} at the start, "
                     f"{' '.join(f'{v:.2f}' for v in end)} at the end, on {cores} logical cores"
                     + (": the machine was busy with other work" if busy else ""))
    noisy = sorted({f"{r['engine']['name']} (batch {r['batch']}: p99/p50 {r['conditions']['p99_over_p50']:.1f})"
                    for r in records if not r.get("baseline")
                    and ((r.get("conditions") or {}).get("p99_over_p50") or 0) > SPREAD_WARN})
    if noisy:
        notes.append(f"noisy timings, p99 over {SPREAD_WARN:g}x p50: " + ", ".join(noisy))
    hows = {(r.get("conditions") or {}).get("peak_rss_how") for r in records
            if (r.get("conditions") or {}).get("own_process")}
    if hows:
        from enginekit.bench.memory import HOW_TEXT

        notes.append("peak RSS: each engine's own (and PyTorch's), timed in a fresh process of its own; "
                     + "; ".join(HOW_TEXT.get(h or "", str(h)) for h in sorted(hows, key=str)))
    return notes


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1], sys.argv[2]))
