"""The speed targets of ``optimize``, measured on this machine (a script, not a timed test).

For the detector-shaped ``vit_small_patch16_384`` checkpoint of
:mod:`benchmarks.detector` (seeded body, a 2-label head fitted so its decisions
have margin; built into ``WORK/detector`` when missing), batch 1, 384x384:

1. ``optimize``'s pick against PyTorch eager fp32 timed in the same run: the target is
   at least 3x on a CPU with AVX512-BF16 or AMX, 2.5x on one without (AVX2 only), with
   top-1 agreement >= 0.99 and logits cosine >= 0.999 against PyTorch on **both**
   held-out sets: photo crops from the calibration source and the differently made
   ``patterns`` set;
2. cold start of the pick: ``enginekit.load`` + the first inference in a fresh
   process, against one warm inference in that process; the target is at most 3x.
   Measured with the OpenVINO model cache empty and again with it filled,
   ``--cold-repeats`` times each (the run with the median ratio is shown, with the range);
3. the arithmetic floor: the model's multiply-adds (``torch.utils.flop_counter``)
   over this CPU's measured peak GEMM rate in the pick's precision, and the pick's
   time by layer type (OpenVINO's per-layer counters), which says what is left.

Every number is measured by this script; it prints a markdown summary and writes
``--json``. About 15 minutes on 2 cores::

    .venv/bin/python -m benchmarks.targets --work out/targets
    .venv/bin/python -m benchmarks.targets --work out/targets --reuse   # cold start + floor of that pick
    .venv/bin/python -m benchmarks.targets --model timm:test_vit --eval-size 16 --runs 5   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import child_env

__all__ = ["arithmetic_floor", "cold_start", "main", "model_macs", "peak_gemm_rates", "precision_ceilings",
           "speedup_target"]

#: The speed-up target by what the CPU computes bf16 with: 3x with AVX512-BF16 or AMX, 2.5x without.
TARGET_SPEEDUP_BF16 = 3.0
TARGET_SPEEDUP = 2.5
TARGET_COLD_RATIO = 3.0
TARGET_AGREEMENT = 0.99
TARGET_COSINE = 0.999


def speedup_target(flags: list[str] | tuple[str, ...]) -> float:
    """The speed-up the pick must reach on a CPU with ``flags``."""
    return TARGET_SPEEDUP_BF16 if {"avx512_bf16", "amx_bf16"} & set(flags) else TARGET_SPEEDUP

_COLD = (
    "import json, sys; from benchmarks.targets import cold_start; "
    "print(json.dumps(cold_start(sys.argv[1], int(sys.argv[2]))))"
)


def cold_start(path: str, runs: int) -> dict[str, Any]:
    """In this (fresh) process: import the backend library, ``enginekit.load`` (sha256 checks,
    session or device compile), the first inference, then the warm p50 over ``runs`` calls.

    ``load_ms`` includes the backend import (what a fresh CLI process pays);
    ``ratio`` is (load + first) / warm; ``ratio_preloaded`` leaves the import out
    (a server that imported its backend at start-up, then loads engines).
    """
    import importlib

    from enginekit.api import default_backend
    from enginekit.bench.harness import BenchConfig, latency_stats, make_feeds, time_callable
    from enginekit.manifest import read_manifest

    module = {"openvino": "openvino", "onnxruntime": "onnxruntime"}[default_backend(read_manifest(path))]
    start = time.perf_counter()
    importlib.import_module(module)
    imported = time.perf_counter()
    import enginekit

    clf = enginekit.load(path, device="cpu")
    loaded = time.perf_counter()
    x = make_feeds(clf.runner.inputs, 1)[clf.runner.inputs[0].name]
    clf.run_pixels(x)
    first = time.perf_counter()
    warm = latency_stats(time_callable(lambda: clf.run_pixels(x), BenchConfig(warmup=3, runs=runs)))
    cached = getattr(clf.runner, "loaded_from_cache", None)
    clf.close()
    import_ms, load_ms, first_ms = (imported - start) * 1e3, (loaded - imported) * 1e3, (first - loaded) * 1e3
    return {"import_ms": import_ms, "load_ms": import_ms + load_ms, "load_preloaded_ms": load_ms,
            "first_ms": first_ms, "warm_p50_ms": warm["p50"], "ratio": (import_ms + load_ms + first_ms) / warm["p50"],
            "ratio_preloaded": (load_ms + first_ms) / warm["p50"], "loaded_from_cache": cached}


def _cold_in_subprocess(path: Path, runs: int, cache_dir: Path) -> dict[str, Any]:
    env = child_env(ENGINEKIT_CACHE_DIR=str(cache_dir))
    proc = subprocess.run([sys.executable, "-c", _COLD, str(path), str(runs)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cold start of {path} failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_macs(model: Any, size: tuple[int, int]) -> float:
    """Multiply-adds of one batch-1 forward, from PyTorch's own FLOP counter (matmuls,
    convolutions and attention; 2 FLOPs per multiply-add).

    Attention runs on SDPA's math path while counting: the counter has no formula
    for the fused CPU kernel and would leave its two batched matmuls out (a quarter
    of vit_small_patch16_384's multiply-adds at 577 tokens).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, *size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    return counter.get_total_flops() / 2


def _time_best(fn: Any, seconds: float = 2.0) -> float:
    """Best wall time of ``fn`` over ``seconds`` (peak rate: the best call is the least disturbed)."""
    fn()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _int8_gemm_model(n: int) -> Any:
    """An ONNX QDQ MatMul (n x n by n x n, symmetric int8), which OpenVINO's CPU plugin runs as an int8 GEMM."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"]),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def peak_gemm_rates(threads: int, n: int = 2048) -> dict[str, float]:
    """Measured multiply-adds per second of an n x n x n GEMM: fp32 and bf16 in OpenVINO
    (f32 / bf16 inference precision), int8 through OpenVINO's int8 kernels; PyTorch fp32 beside them."""
    import torch

    rates: dict[str, float] = {}
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    rates["fp32 (pytorch)"] = n**3 / _time_best(lambda: a @ b)
    try:
        import openvino as ov
    except ImportError:
        return rates
    core = ov.Core()
    x = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        import onnx

        path = Path(tmp) / "gemm.onnx"
        onnx.save(_int8_gemm_model(n), str(path))
        float_model = ov.convert_model(str(path))
        for label, model, precision in (("int8 (openvino)", float_model, "f32"),):
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                          "INFERENCE_NUM_THREADS": threads})
            req = compiled.create_infer_request()
            rates[label] = n**3 / _time_best(lambda req=req: req.infer({0: x}))
    # float GEMM: a plain MatMul against a constant weight
    param = ov.opset13.parameter([n, n], ov.Type.f32)
    const = ov.opset13.constant(np.random.default_rng(2).standard_normal((n, n)).astype(np.float32))
    gemm = ov.Model([ov.opset13.matmul(param, const, False, False)], [param])
    for label, precision in (("fp32 (openvino)", "f32"), ("bf16 (openvino)", "bf16")):
        compiled = core.compile_model(gemm, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                     "INFERENCE_NUM_THREADS": threads})
        req = compiled.create_infer_request()
        rates[label] = n**3 / _time_best(lambda req=req: req.infer({0: x}))
    return rates


def _precision_rate(picked: dict[str, Any], rates: dict[str, float]) -> tuple[str, float]:
    precision = picked["candidate"]["precision"]
    name = picked["candidate"]["name"]
    if precision == "int8" and picked["candidate"]["method"] in ("int8-static", "int8-qdq"):
        key = "int8 (openvino)"
    elif precision in ("bf16", "fp16") or name.endswith("bf16"):
        key = "bf16 (openvino)"
    else:
        key = "fp32 (openvino)"
    key = key if key in rates else "fp32 (pytorch)"
    return key, rates[key]


def arithmetic_floor(macs: float, rate: float) -> float:
    """Milliseconds one forward takes if every multiply-add ran at ``rate`` (multiply-adds per second)."""
    return macs / rate * 1e3


def precision_ceilings(macs: float, rates: dict[str, float], pytorch_ms: float,
                       candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per precision with a measured peak (its best backend's): the floor, the speed-up
    over PyTorch it caps, and the fastest timed candidate computing in that precision."""
    best: dict[str, float] = {}
    for key, rate in rates.items():
        precision = key.split()[0]
        best[precision] = max(best.get(precision, 0.0), rate)
    out = []
    for precision, rate in best.items():
        floor = arithmetic_floor(macs, rate)
        timed = [c for c in candidates if c.get("record") and c["candidate"]["precision"] == precision]
        fastest = min(timed, key=lambda c: c["record"]["latency_ms"]["p50"]) if timed else None
        out.append({"precision": precision, "rate": rate, "floor_ms": floor, "max_speedup": pytorch_ms / floor,
                    "fastest": fastest["candidate"]["name"] if fastest else None,
                    "fastest_ms": fastest["record"]["latency_ms"]["p50"] if fastest else None})
    return out


def layer_profile(path: Path, runs: int = 10) -> dict[str, float] | None:
    """Mean milliseconds per inference by (layer type, kernel) from OpenVINO's per-layer counters."""
    from enginekit.manifest import read_manifest

    manifest = read_manifest(path)
    if manifest.kind != "openvino":
        return None
    import openvino as ov

    from enginekit.bench.harness import make_feeds
    from enginekit.registry import get_backend

    backend = get_backend("openvino")
    config = backend._config(manifest, None)  # the engine's own settings, uncached
    config["PERF_COUNT"] = True
    compiled = ov.Core().compile_model(str(path / manifest.component().entry), "CPU", config)
    req = compiled.create_infer_request()
    x = make_feeds(manifest.component().inputs, 1)
    for _ in range(3):
        req.infer(x)
    totals: Counter[str] = Counter()
    for _ in range(runs):
        req.infer(x)
        for info in req.profiling_info:
            totals[f"{info.node_type} ({info.exec_type})"] += info.real_time.total_seconds() * 1e3 / runs
    return dict(totals.most_common(8))


class QuietLock:
    """A lock file that says "a benchmark is timing, keep the machine quiet", held only while
    timing: ``acquire`` waits while another holder's file exists, then writes ours; ``release``
    removes ours. Building and judging candidates needs no quiet machine and holds nothing."""

    def __init__(self, path: Path | None, say: Any) -> None:
        self.path, self.say, self.held_since = path, say, None

    def acquire(self) -> None:
        if self.path is None or self.held_since is not None:
            return
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                time.sleep(15)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} benchmarks.targets\n")
        self.held_since = time.monotonic()
        self.say(f"holding the quiet lock {self.path}")

    def release(self) -> None:
        if self.path is not None and self.held_since is not None:
            self.path.unlink(missing_ok=True)
            self.say(f"released the quiet lock after {time.monotonic() - self.held_since:.0f} s")
            self.held_since = None


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median cold/warm ratio, with every run's ratio beside it (a shared
    machine's speed moves between runs)."""
    ranked = sorted(runs, key=lambda r: r["ratio"])
    return {**ranked[(len(ranked) - 1) // 2], "ratios": [r["ratio"] for r in ranked],
            "ratios_preloaded": sorted(r["ratio_preloaded"] for r in runs)}


def _cold_row(label: str, c: dict[str, Any]) -> str:
    total = c["load_ms"] + c["first_ms"]
    spread = (f"; {len(c['ratios'])} runs: {c['ratios'][0]:.1f}-{c['ratios'][-1]:.1f}x"
              if len(c.get("ratios", ())) > 1 else "")
    return (f"| cold start <= {TARGET_COLD_RATIO}x warm, {label} | import {c['import_ms']:.0f} + load "
            f"{c['load_preloaded_ms']:.0f} + first {c['first_ms']:.0f} = {total:.0f} ms = {c['ratio']:.1f}x warm "
            f"{c['warm_p50_ms']:.1f} ms ({c['ratio_preloaded']:.1f}x with the backend already imported{spread}) | "
            f"{'**met**' if c['ratio'] <= TARGET_COLD_RATIO else '**missed**'}"
            f"{' (met with the backend imported)' if c['ratio'] > TARGET_COLD_RATIO >= c['ratio_preloaded'] else ''} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="MODEL for optimize (default: the detector checkpoint, built into WORK/detector)")
    parser.add_argument("--work", type=Path, default=Path("out/targets"))
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tie-margin", type=float, default=0.0,
                        help="optimize --tie-margin: leave near-tied samples out of the agreement budget")
    parser.add_argument("--precisions", default="fp32,fp16,int8,int4", help="optimize --precisions")
    parser.add_argument("--cold-repeats", type=int, default=3,
                        help="Cold starts measured (each with an empty model cache, then filled); the median is "
                             "shown; 0 skips them.")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet-lock", type=Path, default=None,
                        help="Lock file to hold (waiting for others' first) while timing: from optimize's "
                             "timing phase to the end; building and judging run without it.")
    parser.add_argument("--reuse", action="store_true",
                        help="Measure cold start and the floor on the pick already in WORK/best (skip optimize).")
    args = parser.parse_args(argv)

    import torch

    from enginekit.export.sources import resolve_source
    from enginekit.app.optimize import OptimizeConfig, optimize

    threads = args.threads or torch.get_num_threads()
    log = lambda msg: print(f"· {msg}", file=sys.stderr, flush=True)  # noqa: E731
    lock = QuietLock(args.quiet_lock, log)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the lock is released on the way out

    def say(msg: str) -> None:
        if msg.startswith("timing PyTorch"):  # optimize's phase 2: PyTorch, every engine, PyTorch again
            lock.acquire()
        log(msg)

    if args.model is None:
        detector = args.work / "detector"
        if not (detector / "detector.json").is_file():
            from benchmarks.detector import build_detector

            say(f"building the detector-shaped checkpoint -> {detector}")
            build_detector(detector, say=say)
        args.model = str(detector)
    config = OptimizeConfig(batch=1, eval_size=args.eval_size, runs=args.runs, threads=args.threads,
                            tie_margin=args.tie_margin, precisions=tuple(args.precisions.split(",")))
    best = args.work / "best"
    try:
        if args.reuse and (best / "report.json").is_file():
            report = json.loads((best / "report.json").read_text())
        else:
            report = optimize(args.model, best, config, random_weights=args.model.startswith("timm:"),
                              work_dir=args.work / "candidates", overwrite=True, on_step=say)
        picked = next(c for c in report["candidates"] if c["status"] == "picked")
        base = report["baseline"]
        speedup = picked["record"]["speedup"]

        lock.acquire()  # (already held unless --reuse)
        say(f"cold start of the pick in fresh processes (model cache empty, then filled), {args.cold_repeats} times")
        empties, filled = [], []
        for _ in range(args.cold_repeats):
            with tempfile.TemporaryDirectory() as cache:
                empties.append(_cold_in_subprocess(best, args.runs, Path(cache)))
                filled.append(_cold_in_subprocess(best, args.runs, Path(cache)))
        cold, warm_cache = (_median_run(empties), _median_run(filled)) if empties else (None, None)

        say("arithmetic floor: multiply-adds and this CPU's peak GEMM rates")
        src = resolve_source(args.model, random_weights=args.model.startswith("timm:"))
        size = tuple(src.preprocessing.size)
        macs = model_macs(src.model, size)
        rates = peak_gemm_rates(threads)
        rate_key, rate = _precision_rate(picked, rates)
        floor_ms = arithmetic_floor(macs, rate)
        ceilings = precision_ceilings(macs, rates, base["latency_ms"]["p50"], report["candidates"])
        profile = layer_profile(best)
    finally:
        lock.release()

    result = {
        "model": args.model, "hardware": report["hardware"], "threads": threads, "picked": picked["candidate"],
        "speedup": speedup, "pick_p50_ms": picked["record"]["latency_ms"]["p50"],
        "pytorch_p50_ms": base["latency_ms"]["p50"],
        "pytorch_p50_before_ms": report.get("baseline_before", base)["latency_ms"]["p50"],
        "pytorch_p50_after_ms": report["baseline_after"]["latency_ms"]["p50"],
        "fidelity": picked["fidelity"], "cold_start_cache_empty": cold, "cold_start_cache_filled": warm_cache,
        "macs": macs, "peak_macs_per_s": rates, "floor_precision": rate_key, "floor_ms": floor_ms,
        "ceilings": ceilings, "layer_profile_ms": profile, "candidates": report["candidates"],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    fid = picked["fidelity"]
    target = speedup_target(report["hardware"].get("flags") or [])
    ok = lambda cond: "**met**" if cond else "**missed**"  # noqa: E731
    sets = fid.get("sets") or [{**fid, "described": f"{fid['samples']} held-out samples"}]
    result["target_speedup"] = target
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    lines = [
        f"### {args.model}, batch 1, {size[0]}x{size[1]}, {threads} threads",
        "",
        "| target | measured | |",
        "|:---|:---|:---|",
        f"| pick >= {target}x PyTorch eager fp32 (same run) | {picked['candidate']['name']}: "
        f"{picked['record']['latency_ms']['p50']:.1f} ms vs {base['latency_ms']['p50']:.1f} ms = {speedup:.2f}x "
        f"(PyTorch p50 {result['pytorch_p50_before_ms']:.1f} ms before the engines, "
        f"{result['pytorch_p50_after_ms']:.1f} ms after; the faster is the baseline) | {ok(speedup >= target)} |",
        *(f"| top-1 agreement >= {TARGET_AGREEMENT} on {s['described']} | {s['top1_agreement']:.4f} | "
          f"{ok(s['top1_agreement'] >= TARGET_AGREEMENT)} |" for s in sets),
        *([f"| (agreement on decided samples, ties under {args.tie_margin} std left out) | "
           f"{fid['top1_agreement_decided']:.4f} ({fid['ties']} ties) | "
           f"{'met' if fid['top1_agreement_decided'] >= 0.99 else 'missed'} |"] if args.tie_margin else []),
        *(f"| logits cosine >= {TARGET_COSINE} on {s['described']} | {s['logits_cosine']:.5f} | "
          f"{ok(s['logits_cosine'] >= TARGET_COSINE)} |" for s in sets),
        *(_cold_row(label, c) for label, c in (("model cache empty", cold), ("model cache filled", warm_cache))
          if c is not None),
        "",
        f"Arithmetic floor: {macs / 1e9:.2f} G multiply-adds per image. Peak GEMM rates measured here "
        "(2048^3, G multiply-adds/s): " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items()) + ". "
        f"At the {rate_key} peak the floor is {floor_ms:.1f} ms; the pick takes "
        f"{picked['record']['latency_ms']['p50']:.1f} ms, {picked['record']['latency_ms']['p50'] / floor_ms:.1f}x "
        "the floor. Per precision, the floor caps the speed-up any engine computing in it can reach:",
        "",
        "| precision | peak G MAC/s | floor ms | best possible speed-up | fastest candidate | its p50 ms | x floor |",
        "|:---|---:|---:|---:|:---|---:|---:|",
        *(f"| {c['precision']} | {c['rate'] / 1e9:.0f} | {c['floor_ms']:.1f} | {c['max_speedup']:.2f}x "
          f"({'can' if c['max_speedup'] >= target else 'cannot'} reach {target}x) | "
          + (f"{c['fastest']} | {c['fastest_ms']:.1f} | {c['fastest_ms'] / c['floor_ms']:.2f}x |" if c["fastest"]
             else "- | - | - |")
          for c in ceilings),
    ]
    timed = [c for c in report["candidates"] if c.get("record")]
    fastest = min(timed, key=lambda c: c["record"]["latency_ms"]["p50"])
    if fastest is not picked:
        ff = fastest["fidelity"]
        lines += ["", f"The fastest candidate of all was {fastest['candidate']['name']}: "
                  f"{fastest['record']['latency_ms']['p50']:.1f} ms ({fastest['record']['speedup']:.2f}x), agreement "
                  f"{ff['top1_agreement']:.4f}, cosine {ff['logits_cosine']:.5f}: {fastest['status']}"
                  + (f" ({fastest['reason']})" if fastest["reason"] else "") + "."]
    if profile:
        lines += ["", "The pick's time by layer type (OpenVINO counters, ms per inference): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in profile.items())]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
