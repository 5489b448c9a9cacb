"""The pipeline speed target: ``optimize``'s pick on full-size SD 1.5 against diffusers eager fp32.

Target: at 512x512, batch 1 with classifier-free guidance, the pick is at least 2.5x
faster per denoising step than diffusers eager fp32 timed in the same run, at image
PSNR >= 30 dB against diffusers on the same latents (every held-out image). Also
prints where the pick stands against the CPU's arithmetic floor for its precision:

    floor = FLOPs of one UNet call at 512² with CFG (2 rows), counted by
            torch.utils.flop_counter on diffusers' UNet (a multiply-add is 2 FLOPs)
          ÷ peak FLOP/s = physical cores × clock × FLOPs per cycle per core,

with FLOPs per cycle per core assumed from the ISA flags enginekit.hardware reports:
fp32 64 (AVX-512, two FMA ports × 16 lanes × 2) or 32 (AVX2); bf16 1024 (AMX-BF16
TMUL), 128 (AVX512-BF16); int8 2048 (AMX-INT8), 256 (AVX512-VNNI). The clock is
the one the OS reports (psutil / /proc/cpuinfo): on a VM the nominal, not the turbo,
clock. Run (minutes: the export, each OpenVINO compile, diffusers at ~10 s a step):

    python -m enginekit.bench.pipeline_targets --work /tmp/o/targets
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

TARGET_SPEEDUP = 2.5
TARGET_PSNR = 30.0


def clock_ghz() -> float | None:
    """The clock the OS reports, in GHz (None where it reports none)."""
    import psutil

    try:
        freq = psutil.cpu_freq()
    except (NotImplementedError, OSError):  # pragma: no cover - platform-dependent
        freq = None
    if freq and (freq.max or freq.current):
        return (freq.max or freq.current) / 1000.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("cpu mhz"):
                return float(line.split(":", 1)[1]) / 1000.0
    except OSError:
        pass
    return None


def flops_per_cycle(flags: list[str]) -> dict[str, tuple[int, str]]:
    """Per core, per precision: (FLOPs per cycle, the unit assumed)."""
    f = set(flags)
    fp32 = (64, "AVX-512: 2 FMA x 16 lanes x 2") if "avx512f" in f else (32, "AVX2: 2 FMA x 8 lanes x 2")
    bf16 = (1024, "AMX-BF16 TMUL") if "amx_bf16" in f else \
        (128, "AVX512-BF16: 2 x 32 pairs x 2") if "avx512_bf16" in f else fp32
    int8 = (2048, "AMX-INT8 TMUL") if "amx_int8" in f else \
        (256, "AVX512-VNNI: 2 x 64 MACs x 2") if "avx512_vnni" in f else (fp32[0] * 2, "no int8 dot-product unit")
    return {"fp32": fp32, "bf16": bf16, "int8": int8}


def unet_flops(manifest: Any, size: int) -> float:
    """FLOPs of one UNet call on 2 rows (CFG) at ``size``², counted on diffusers' module."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from enginekit.bench.pipeline import _diffusers_pipeline

    pipe = _diffusers_pipeline(manifest)
    unet = pipe.unet
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    x = torch.randn(2, unet.config.in_channels, size // f, size // f)
    ctx = torch.randn(2, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500.0), ctx, return_dict=False)
    return float(counter.get_total_flops())


def _compute_precision(candidate: dict[str, Any], flags: list[str]) -> str:
    p = candidate["precisions"]
    denoiser = next((v for k, v in p.items() if k != "*"), p.get("*", "fp32"))
    if denoiser in ("int8", "int4"):
        return "int8"
    if denoiser == "fp16":  # OpenVINO computes fp16 weights in bf16 where the CPU has it
        return "bf16" if {"amx_bf16", "avx512_bf16"} & set(flags) else "fp32"
    return "fp32"


def main(argv: list[str] | None = None) -> int:
    from enginekit.app.optimize_pipeline import (HELD_OUT_PROMPTS, PipelineOptimizeConfig, optimize_pipeline,
                                                 table_text)
    from enginekit.errors import FidelityError
    from enginekit.manifest import read_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Work folder (export, candidates, the pick).")
    parser.add_argument("--model", default="sd15", help="A --random-weights architecture (sd15, sd21) or a source.")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--backends", default=None, help="Comma-separated (default: every installed one).")
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--prompts", type=int, default=1, help="How many built-in held-out prompts.")
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args(argv)

    from enginekit.export.diffusion.sources import ARCHITECTURES

    config = PipelineOptimizeConfig(
        backends=tuple(args.backends.split(",")) if args.backends else None,
        precisions=tuple(args.precisions.split(",")), min_psnr=TARGET_PSNR, size=args.size, steps=args.steps,
        prompts=HELD_OUT_PROMPTS[: args.prompts], seeds=tuple(int(s) for s in args.seeds.split(",")))
    started = time.monotonic()
    log = lambda msg: print(f"[{time.monotonic() - started:7.0f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        report = optimize_pipeline(args.model, args.work / "best", config, random_weights=args.model in ARCHITECTURES,
                                   work_dir=args.work / "run", overwrite=True, on_step=log)
    except FidelityError as exc:
        print(exc)
        print(f"TARGET MISSED: no candidate kept image PSNR >= {TARGET_PSNR} dB")
        return 1
    best = next(oc for oc in report["candidates"] if oc["status"] == "picked")
    hw = report["hardware"]
    log("counting the UNet's FLOPs on diffusers' module")
    flops = unet_flops(read_manifest(args.work / "best"), report["size"])
    ghz = clock_ghz()
    cores = int(hw.get("physical_cores") or 1)
    per_cycle = flops_per_cycle(hw.get("flags") or [])
    precision = _compute_precision(best["candidate"], hw.get("flags") or [])
    step_ms = best["timing"]["step_ms"]
    unet_ms = best["timing"]["components_ms"].get(report["denoiser"])
    floor: dict[str, Any] = {"unet_gflop_per_step": flops / 1e9, "clock_ghz": ghz, "cores": cores,
                             "compute_precision": precision, "assumed_flops_per_cycle": per_cycle}
    if ghz:
        for p, (n, _) in per_cycle.items():
            floor[f"floor_ms_{p}"] = flops / (cores * ghz * 1e9 * n) * 1e3
        floor["pick_vs_floor"] = step_ms / floor[f"floor_ms_{precision}"]
    floor["pick_unet_tflops"] = flops / (unet_ms / 1e3) / 1e12 if unet_ms else None
    floor["unet_share_of_step"] = unet_ms / step_ms if unet_ms else None
    speedup, psnr = best["speedup_step"], best["fidelity"]["psnr_db_min"]
    met = speedup >= TARGET_SPEEDUP and psnr >= TARGET_PSNR
    result = {"target": {"speedup_step": TARGET_SPEEDUP, "psnr_db": TARGET_PSNR, "met": met},
              "picked": report["picked"], "speedup_step": speedup, "psnr_db_min": psnr, "floor": floor,
              "baseline": report["baseline"], "report": str(args.work / "best" / "report.md"),
              "seconds": time.monotonic() - started}
    (args.work / "targets.json").write_text(json.dumps({"result": result, "report": report}, indent=2, default=str))

    print(f"# optimize {args.model} at {report['size']}x{report['size']}, batch 1 + CFG, {report['steps']} steps; "
          f"{hw.get('cpu_model')}, {hw.get('logical_cores')} logical cores")
    print(table_text(report))
    print()
    print(f"pick: {report['picked']}: {speedup:.2f}x faster per step than diffusers eager fp32 "
          f"({step_ms:.0f} vs {report['baseline']['step_ms']:.0f} ms), worst image PSNR {psnr:.2f} dB -> "
          + ("TARGET MET" if met else f"TARGET MISSED (needs >= {TARGET_SPEEDUP}x at >= {TARGET_PSNR} dB)"))
    print(f"UNet at {report['size']}² with CFG: {flops / 1e9:.1f} GFLOP per step (torch.utils.flop_counter)")
    if ghz:
        print(f"peak: {cores} cores x {ghz:.2f} GHz x FLOPs/cycle/core "
              + ", ".join(f"{p} {n} ({why})" for p, (n, why) in per_cycle.items()))
        print("arithmetic floor per step: " + ", ".join(f"{p} {floor[f'floor_ms_{p}']:.1f} ms" for p in per_cycle)
              + f"; the pick computes in {precision}: {floor['pick_vs_floor']:.1f}x its floor")
    else:
        print("the OS reports no clock: no arithmetic floor")
    if unet_ms:
        print(f"the pick's UNet call: {unet_ms:.0f} ms ({floor['unet_share_of_step']:.0%} of the step), "
              f"{floor['pick_unet_tflops']:.2f} TFLOP/s achieved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
