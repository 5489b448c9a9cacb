"""Batch-1 CPU latency of a timm ViT: PyTorch eager against our engines, in one run.

Measures ``vit_small_patch16_384`` (seeded random weights, 384x384, batch 1) in
PyTorch eager fp32 (the baseline), ONNX Runtime on the exported ONNX, ONNX
Runtime on the offline-optimized (compiled) ONNX, and OpenVINO IR. Per engine:

- cold start, in a fresh interpreter per engine: ``load`` is the wall time of
  ``enginekit.load(path, device='cpu')`` (backend import, sha256 checks, session
  or device compile; OpenVINO with an empty model cache), ``first`` the first
  inference after it. OpenVINO is loaded a second time with that cache warm.
- warm latency p50/p90/p99 over ``--runs`` calls after ``--warmup``, throughput
  (1000/p50), speed-up against PyTorch's p50, and max |logits - PyTorch| on the
  same seeded input, so fidelity sits in the same row as speed.

Run (artifacts in ``--work`` are reused when their manifests match; ``--rebuild``
re-exports)::

    python -m benchmarks.vit_cpu                      # the real model, ~2 min export
    python -m benchmarks.vit_cpu --model timm:test_vit --runs 5 --warmup 2   # smoke
    python -m benchmarks.vit_cpu --threads 4 --json out/vit-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import child_env
from enginekit.bench.harness import BenchConfig, latency_stats, time_callable
from enginekit.registry import backend_class

#: (row label, artifact sub-folder, backend compiled with or None for the export itself).
ENGINES = (
    ("onnxruntime (exported onnx)", "onnx", None),
    ("onnxruntime (compiled)", "ort", "onnxruntime"),
    ("openvino (compiled)", "openvino", "openvino"),
)
#: Where each compiled kind records CompileOptions.threads in its manifest target.
_COLD = (
    "import json, sys; from benchmarks.vit_cpu import cold_start; "
    "print(json.dumps(cold_start(sys.argv[1], int(sys.argv[2]), sys.argv[3])))"
)
COLUMNS = (  # (header, row key, format)
    ("engine", "engine", "{}"),
    ("load (ms)", "load_ms", "{:.0f}"),
    ("first (ms)", "first_ms", "{:.1f}"),
    ("p50 (ms)", "p50_ms", "{:.2f}"),
    ("p90 (ms)", "p90_ms", "{:.2f}"),
    ("p99 (ms)", "p99_ms", "{:.2f}"),
    ("img/s", "images_per_s", "{:.1f}"),
    ("speed-up", "speedup", "{:.2f}x"),
    ("max abs diff", "max_abs_diff", "{:.1e}"),
)


def open_classifier(path: str | Path, threads: int = 0) -> Any:
    """``enginekit.load(path, device='cpu')``, with ``threads`` forced on a plain ONNX artifact.

    Compiled artifacts carry ``CompileOptions.threads`` in their manifest target
    and the runners apply it at load; an exported ONNX folder records none, so
    its target is overridden in memory here (the files are still verified).
    """
    import enginekit
    from enginekit.manifest import read_manifest

    path = Path(path)
    manifest = read_manifest(path)
    if not threads or manifest.kind != "onnx":
        return enginekit.load(path, device="cpu")
    from enginekit.artifact import verify_artifact
    from enginekit.registry import get_backend
    from enginekit.runtimes.tasks.classifier import ImageClassifier

    verify_artifact(path, manifest)
    manifest = manifest.replace(target={**manifest.target, "intra_op_num_threads": threads})
    return ImageClassifier(get_backend("onnxruntime").load(path, manifest, "cpu"), manifest, path)


def cold_start(path: str, threads: int, input_npy: str) -> dict[str, Any]:
    """Load + first inference in this (fresh) process; what the subprocess prints."""
    x = np.load(input_npy)
    start = time.perf_counter()
    clf = open_classifier(path, threads)
    loaded = time.perf_counter()
    clf.run_pixels(x)
    first = time.perf_counter()
    cached = getattr(clf.runner, "loaded_from_cache", None)
    clf.close()
    return {"load_ms": (loaded - start) * 1e3, "first_ms": (first - loaded) * 1e3, "loaded_from_cache": cached}


def _cold_in_subprocess(path: Path, threads: int, input_npy: Path, cache_dir: Path) -> dict[str, Any]:
    env = child_env(ENGINEKIT_CACHE_DIR=str(cache_dir))
    proc = subprocess.run([sys.executable, "-c", _COLD, str(path), str(threads), str(input_npy)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cold start of {path} failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _speed(fn: Callable[[], Any], warmup: int, runs: int) -> dict[str, float]:
    """Warm latency percentiles from the bench harness's timer."""
    stats = latency_stats(time_callable(fn, BenchConfig(warmup=warmup, runs=runs)))
    return {"p50_ms": stats["p50"], "p90_ms": stats["p90"], "p99_ms": stats["p99"],
            "images_per_s": 1000.0 / stats["p50"]}


def _matches(path: Path, want: Callable[[Any], bool]) -> bool:
    from enginekit.errors import EngineKitError
    from enginekit.manifest import read_manifest

    try:
        return (path / "manifest.json").is_file() and want(read_manifest(path))
    except (EngineKitError, OSError, KeyError, TypeError, ValueError):
        return False


def build_artifacts(source: Any, spec: str, work: Path, threads: int, rebuild: bool,
                    say: Callable[[str], None]) -> None:
    """Export to ``work/onnx`` and compile ``work/ort`` and ``work/openvino``, unless up to date."""
    from enginekit.api import compile_artifact
    from enginekit.export.vit import export_classifier
    from enginekit.manifest import read_manifest
    from enginekit.runtimes.base import CompileOptions

    onnx_dir = work / "onnx"
    if rebuild or not _matches(onnx_dir, lambda m: m.provenance.get("source") == source.provenance.get("source")
                               and m.provenance.get("seed") == source.provenance.get("seed")):
        say(f"exporting {spec} -> {onnx_dir} (with a parity check against PyTorch)")
        export_classifier(source, onnx_dir, overwrite=True, on_step=say)
    else:
        say(f"reusing {onnx_dir}")
    digest = read_manifest(onnx_dir).digest()
    for _, name, backend in ENGINES[1:]:

        def up_to_date(m: Any, backend: str = backend) -> bool:
            return (m.provenance["parent"]["manifest_sha256"] == digest
                    and int(m.target.get(backend_class(backend).threads_key) or 0) == threads)

        if rebuild or not _matches(work / name, up_to_date):
            say(f"compiling {backend} -> {work / name}")
            compile_artifact(onnx_dir, backend, work / name, CompileOptions(threads=threads), overwrite=True)
        else:
            say(f"reusing {work / name}")


def measure(args: argparse.Namespace, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Build (or reuse) the artifacts and return one row per engine, PyTorch first."""
    import torch

    from enginekit.export.sources import resolve_source

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    say(f"building {args.model} with seeded random weights")
    source = resolve_source(args.model, random_weights=args.model.startswith("timm:"), seed=0)
    build_artifacts(source, args.model, work, args.threads, args.rebuild, say)

    height, width = source.preprocessing.size
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    input_npy = work / "bench-input.npy"
    np.save(input_npy, x.numpy())
    say("timing pytorch eager fp32")
    with torch.inference_mode():
        out = source.model(x)
        reference = (out if isinstance(out, torch.Tensor) else out.logits).numpy()
        torch_speed = _speed(lambda: source.model(x), args.warmup, args.runs)
    rows = [{"engine": "pytorch eager fp32", "artifact": None, "load_ms": None, "first_ms": None,
             **torch_speed, "speedup": 1.0, "max_abs_diff": 0.0}]

    with tempfile.TemporaryDirectory(prefix="enginekit-bench-") as tmp:
        for i, (label, name, backend) in enumerate(ENGINES):
            path = work / name
            say(f"cold start of {label} in a fresh process")
            cache = Path(tmp) / f"cache-{i}"
            cold = _cold_in_subprocess(path, args.threads, input_npy, cache)
            row: dict[str, Any] = {"engine": label, "artifact": str(path), "load_ms": cold["load_ms"],
                                   "first_ms": cold["first_ms"]}
            if backend == "openvino":  # a second fresh process finds the model cache warm
                again = _cold_in_subprocess(path, args.threads, input_npy, cache)
                row.update(load_cached_ms=again["load_ms"], first_cached_ms=again["first_ms"],
                           loaded_from_cache=again["loaded_from_cache"])
            say(f"timing {label}")
            with open_classifier(path, args.threads) as clf:
                feed = x.numpy()
                logits = clf.run_pixels(feed)["logits"]
                row.update(_speed(lambda: clf.run_pixels(feed), args.warmup, args.runs))
            row["speedup"] = torch_speed["p50_ms"] / row["p50_ms"]
            row["max_abs_diff"] = float(np.abs(logits - reference).max())
            rows.append(row)
    return rows


def header(fp: dict[str, Any], args: argparse.Namespace, torch_threads: int) -> str:
    v = fp["versions"]
    threads = f"{args.threads}" if args.threads else f"0 = backend defaults (torch uses {torch_threads})"
    return (f"{args.model} · batch 1 · fp32 · {fp['cpu_model']} · {fp['physical_cores']} physical / "
            f"{fp['logical_cores']} logical cores · isa: {' '.join(fp['flags']) or '-'} · "
            f"torch {v.get('torch', '-')} · onnxruntime {v.get('onnxruntime', '-')} · openvino {v.get('openvino', '-')} "
            f"· threads: {threads} · warmup {args.warmup}, runs {args.runs}")


def _cells(row: dict[str, Any]) -> list[str]:
    return ["-" if row.get(key) is None else fmt.format(row[key]) for _, key, fmt in COLUMNS]


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_cells(r)) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:vit_small_patch16_384", help="source spec (timm:test_vit for a smoke run)")
    parser.add_argument("--work", default="out/bench-vit", help="folder for the onnx/, ort/, openvino/ artifacts")
    parser.add_argument("--rebuild", action="store_true", help="re-export and re-compile even when up to date")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before the timed ones")
    parser.add_argument("--runs", type=int, default=50, help="timed calls (p50/p90/p99 are over these)")
    parser.add_argument("--threads", type=int, default=0, help="torch, ORT intra-op and OpenVINO threads (0: defaults)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("--runs must be at least 1, --warmup and --threads at least 0")

    import torch
    from rich.console import Console
    from rich.table import Table

    from enginekit.hardware import fingerprint

    console = Console(width=None if sys.stdout.isatty() else 160)  # a pipe would get 80 columns
    rows = measure(args, lambda msg: console.print(f"[dim]· {msg}[/dim]"))
    fp = fingerprint()
    head = header(fp, args, torch.get_num_threads())
    console.print("\n" + head, markup=False, highlight=False)
    table = Table(caption="max abs diff: of the logits against PyTorch eager on the same seeded input")
    for i, (title, _, _) in enumerate(COLUMNS):
        table.add_column(title, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*_cells(row))
    console.print(table)
    for row in rows:
        if "load_cached_ms" in row:
            console.print(f"{row['engine']}: load with a warm model cache {row['load_cached_ms']:.0f} ms, "
                          f"first {row['first_cached_ms']:.1f} ms (loaded_from_cache={row['loaded_from_cache']})")
    console.print("\n" + head + "\n\n" + markdown(rows), markup=False, highlight=False, soft_wrap=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {**{k: getattr(args, k) for k in ("model", "threads", "warmup", "runs")}, "fingerprint": fp, "rows": rows}
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        console.print(f"[dim]rows written to {args.json}[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
