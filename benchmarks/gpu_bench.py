"""GPU latency on one card, in one run: TensorRT, ONNX Runtime CUDA, PyTorch eager and torch.compile.

Models (seeded random weights, so it runs offline):

- ``vit``: ``timm:vit_small_patch16_384`` at batch 1 and 8 -- TensorRT fp32 and fp16 plans
  (fp16 by Model Optimizer's AutoCast), ONNX Runtime's CUDA provider on the fp32 ONNX, PyTorch
  eager fp32 and fp16 (autocast) and ``torch.compile`` fp16; max |logits - PyTorch fp32| beside
  each speed.
- ``sd15``: SD 1.5's UNet, one CFG step (batch 2, 64x64 latents, 512x512 images) -- TensorRT fp16
  (a static 512x512 bucket), ONNX Runtime CUDA fp32, PyTorch fp16 eager and ``torch.compile``;
  then a 20-step 512x512 image end to end, TensorRT plans against diffusers on the same card.

Written for ``bench/gpu_check.sh``; it has not run on a GPU yet. Prints a markdown table and
writes ``--json`` with the hardware fingerprint::

    python -m benchmarks.gpu_bench --model vit --json out/gpu-vit.json
    python -m benchmarks.gpu_bench --model sd15 --runs 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from enginekit.bench.harness import BenchConfig, latency_stats, time_callable
from enginekit.hardware import fingerprint


def _row(name: str, samples: list[float], batch: int, error: float | None = None) -> dict[str, Any]:
    stats = latency_stats(samples)
    return {"engine": name, "batch": batch, **{k: stats[k] for k in ("p50", "p90", "p99")},
            "images_per_s": 1000 * batch / stats["p50"], "max_abs_vs_torch_fp32": error}


def _torch_timer(fn: Callable[[], Any]) -> Callable[[], Any]:
    import torch

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def bench_vit(work: Path, config: BenchConfig) -> list[dict[str, Any]]:
    import torch

    from enginekit.api import compile_artifact, load_runner
    from enginekit.app.build import build_engine
    from enginekit.engine import CompileOptions
    from enginekit.export.sources import resolve_source
    from enginekit.export.vit import export_classifier

    src = resolve_source("timm:vit_small_patch16_384", random_weights=True, seed=0)
    onnx_dir = work / "vit-onnx"
    if not onnx_dir.exists():
        export_classifier(src, onnx_dir)
    engines = {"tensorrt fp32": (work / "vit-trt", "tensorrt", "fp32"),
               "tensorrt fp16": (work / "vit-trt-fp16", "tensorrt", "fp16"),
               "onnxruntime cuda fp32": (work / "vit-ort-cuda", "onnxruntime", "fp32")}
    for path, backend, precision in engines.values():
        if not path.exists():
            if backend == "tensorrt":
                build_engine(onnx_dir, backend, path, device="cuda", precision=precision)
            else:
                compile_artifact(onnx_dir, backend, path, CompileOptions(device="cuda"))
    model = src.model.cuda().eval()
    compiled = torch.compile(model)
    rows = []
    for batch in config.batch_sizes:
        x = np.random.default_rng(0).standard_normal((batch, 3, 384, 384)).astype(np.float32)
        xt = torch.from_numpy(x).cuda()
        with torch.no_grad():
            reference = model(xt).float().cpu().numpy()
            rows.append(_row("pytorch eager fp32", time_callable(_torch_timer(lambda: model(xt)), config), batch, 0.0))
            with torch.autocast("cuda", dtype=torch.float16):
                half = model(xt).float().cpu().numpy()
                rows.append(_row("pytorch eager fp16", time_callable(_torch_timer(lambda: model(xt)), config), batch,
                                 float(np.abs(half - reference).max())))
                out = compiled(xt).float().cpu().numpy()  # the compile happens here, untimed
                rows.append(_row("torch.compile fp16", time_callable(_torch_timer(lambda: compiled(xt)), config), batch,
                                 float(np.abs(out - reference).max())))
        for name, (path, _, _) in engines.items():
            runner, _ = load_runner(path, device="cuda")
            with runner:
                got = runner.run({"pixel_values": x})["logits"]
                samples = time_callable(lambda: runner.run({"pixel_values": x}), config)
            rows.append(_row(name, samples, batch, float(np.abs(got - reference).max())))
    return rows


def bench_sd15(work: Path, config: BenchConfig) -> list[dict[str, Any]]:
    import torch

    import enginekit
    from enginekit.api import compile_artifact, load_runner
    from enginekit.app.build import build_engine
    from enginekit.engine import CompileOptions
    from enginekit.export.diffusion.sd import export_pipeline
    from enginekit.export.diffusion.sources import resolve_pipeline

    onnx_dir, trt_dir, ort_dir = work / "sd15-onnx", work / "sd15-trt-fp16", work / "sd15-ort-cuda"
    if not onnx_dir.exists():
        export_pipeline("sd15", onnx_dir, random_weights=True)
    if not trt_dir.exists():
        build_engine(onnx_dir, "tensorrt", trt_dir, device="cuda", precision="fp16", height=512, width=512, batch=1)
    if not ort_dir.exists():
        compile_artifact(onnx_dir, "onnxruntime", ort_dir, CompileOptions(device="cuda"))
    pipe = resolve_pipeline("sd15", random_weights=True, seed=0).pipeline.to("cuda", torch.float16)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 64, 64)).astype(np.float32),
             "timestep": np.full((2,), 500, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 768)).astype(np.float32)}
    torch_feeds = [torch.from_numpy(feeds[k]).cuda().half() for k in ("sample", "timestep", "encoder_hidden_states")]
    unet = pipe.unet.eval()
    compiled = torch.compile(unet)
    rows = []
    with torch.no_grad():
        reference = unet(*torch_feeds).sample.float().cpu().numpy()
        rows.append(_row("pytorch eager fp16 unet step", time_callable(_torch_timer(lambda: unet(*torch_feeds)),
                                                                       config), 2, 0.0))
        compiled(*torch_feeds)
        rows.append(_row("torch.compile fp16 unet step", time_callable(_torch_timer(lambda: compiled(*torch_feeds)),
                                                                       config), 2, None))
    for name, path in (("tensorrt fp16 unet step", trt_dir), ("onnxruntime cuda fp32 unet step", ort_dir)):
        runner, _ = load_runner(path, device="cuda", component="unet")
        with runner:
            got = runner.run({s.name: feeds[s.name] for s in runner.inputs})["out_sample"]
            samples = time_callable(lambda: runner.run({s.name: feeds[s.name] for s in runner.inputs}), config)
        rows.append(_row(name, samples, 2, float(np.abs(got - reference).max())))
    call = dict(num_inference_steps=20, guidance_scale=7.5, height=512, width=512)
    with enginekit.load(trt_dir, device="cuda") as trt_pipe:
        trt_pipe("warm-up", seed=0, **call)
        start = time.perf_counter()
        trt_pipe("a lighthouse at dusk", seed=0, **call)
        rows.append({"engine": "tensorrt fp16, 20-step image", "batch": 1, "p50": 1e3 * (time.perf_counter() - start)})
    pipe.set_progress_bar_config(disable=True)
    pipe("warm-up", **call)
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe("a lighthouse at dusk", **call)
    torch.cuda.synchronize()
    rows.append({"engine": "diffusers fp16, 20-step image", "batch": 1, "p50": 1e3 * (time.perf_counter() - start)})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| engine | batch | p50 ms | p90 ms | images/s | max abs vs torch fp32 |", "|---|---|---|---|---|---|"]
    for r in rows:
        err = r.get("max_abs_vs_torch_fp32")
        lines.append(f"| {r['engine']} | {r['batch']} | {r['p50']:.2f} | {r.get('p90', float('nan')):.2f} | "
                     f"{r.get('images_per_s', float('nan')):.1f} | {'-' if err is None else f'{err:.3g}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vit", "sd15", "all"], default="all")
    parser.add_argument("--work", type=Path, default=Path("out/gpu-bench"))
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"hardware": fingerprint()}
    if args.model in ("vit", "all"):
        result["vit_small_patch16_384"] = bench_vit(args.work, BenchConfig(batch_sizes=(1, 8), warmup=args.warmup,
                                                                           runs=args.runs))
        print("## vit_small_patch16_384\n\n" + markdown(result["vit_small_patch16_384"]) + "\n")
    if args.model in ("sd15", "all"):
        result["sd15"] = bench_sd15(args.work, BenchConfig(warmup=args.warmup, runs=args.runs))
        print("## SD 1.5 (seeded weights)\n\n" + markdown(result["sd15"]) + "\n")
    gpus = result["hardware"]["gpus"]
    print(f"card: {gpus[0]['name'] if gpus else 'none'}; every row above ran on it, in this one process")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
