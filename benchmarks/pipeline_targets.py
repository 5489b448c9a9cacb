"""The pipeline speed target: ``optimize``'s pick on full-size SD 1.5 against diffusers eager fp32.

Target: at 512x512, batch 1 with classifier-free guidance, the pick is at least 2.5x
faster per denoising step than diffusers eager fp32 timed in the same run, at image
PSNR >= 30 dB against diffusers on the same latents (every held-out image). Also
prints where the pick stands against the CPU's arithmetic floor for its precision:

    floor = FLOPs of one UNet call at 512² with CFG (2 rows), counted by
            torch.utils.flop_counter on diffusers' UNet (a multiply-add is 2 FLOPs)
          ÷ peak FLOP/s = physical cores × clock × FLOPs per cycle per core,

Peak memory: after ``optimize``, diffusers eager fp32 and the pick each generate one held-out
image alone in a fresh subprocess (``--no-peak-memory`` skips it); each reports its process's
peak RSS (``VmHWM``: imports, weights, compiled engine and activations; not ``ru_maxrss``,
which carries this parent's high-water mark into the child) and its times.

FLOPs per cycle per core are assumed from the ISA flags enginekit.hardware reports:
fp32 64 (AVX-512, two FMA ports × 16 lanes × 2) or 32 (AVX2); bf16 1024 (AMX-BF16
TMUL), 128 (AVX512-BF16); int8 2048 (AMX-INT8), 256 (AVX512-VNNI). The clock is
the one the OS reports (psutil / /proc/cpuinfo): on a VM the nominal, not the turbo,
clock. Run (minutes: the export, each OpenVINO compile, diffusers at ~10 s a step):

    python -m benchmarks.pipeline_targets --work /tmp/o/targets
    python -m benchmarks.pipeline_targets --work /tmp/o/sd35m --model sd35-medium --no-t5 \
        --backends openvino --precisions fp16 --steps 2 --seeds 0
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

#: One image alone in a fresh process: argv = side ("diffusers" or a backend), artifact, size,
#: steps, prompt, threads. Prints one JSON line.
_PEAK_CHILD = r"""
import json, sys
side, path, size, steps, prompt, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
from enginekit.bench.pipeline_images import ImageJob, diffusers_images, engine_images, generation_plan
from enginekit.manifest import read_manifest
manifest = read_manifest(path)
plan = generation_plan(manifest.task_config, size, steps)
jobs = [ImageJob(prompt, 0)]
if side == "diffusers":
    from enginekit.export.diffusion.reference import reference_pipeline as _diffusers_pipeline
    gen = diffusers_images(_diffusers_pipeline(manifest), jobs, plan, threads, warmup=False)
else:
    gen, _ = engine_images(path, side, jobs, plan, threads)
s = gen.summary()
from enginekit.bench.memory import vm_hwm_bytes  # this process's own mark: ru_maxrss carries the parent's
print(json.dumps({"peak_rss_bytes": vm_hwm_bytes(), "step_ms": s["step_ms"], "image_ms": s["image_ms"]}))
"""


def peak_memory(side: str, artifact: Path, size: int, steps: int, prompt: str, threads: int,
                timeout_s: float = 3600) -> dict[str, Any]:
    """One image by ``side`` (diffusers, or the artifact on a backend) alone in a subprocess: its
    peak RSS and times."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _PEAK_CHILD, side, str(artifact), str(size), str(steps), prompt,
                           str(threads)], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"side": side, "error": f"exit {proc.returncode}: {tail}"}
    return {"side": side, **json.loads(proc.stdout.strip().splitlines()[-1])}


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
    """FLOPs of one denoiser call on 2 rows (CFG) at ``size``², counted on diffusers' module:
    the UNet, or SD3's transformer (77 CLIP + ``max_sequence_length`` T5 tokens, zeros without T5,
    as diffusers pads). FLUX (one row, no CFG) is not counted: raises NotImplementedError."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from enginekit.export.diffusion.reference import reference_pipeline as _diffusers_pipeline

    pipe = _diffusers_pipeline(manifest)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if getattr(pipe, "unet", None) is not None:
        model = pipe.unet
        x = torch.randn(2, model.config.in_channels, size // f, size // f)
        ctx = torch.randn(2, pipe.tokenizer.model_max_length, model.config.cross_attention_dim)
        added = None
        if model.config.addition_embed_type == "text_time":  # SDXL: pooled CLIP-G text and the size ids
            added = {"text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim),
                     "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)}
        call = lambda: model(x, torch.tensor(500.0), ctx, added_cond_kwargs=added, return_dict=False)  # noqa: E731
    elif type(pipe).__name__ == "StableDiffusion3Pipeline":
        model = pipe.transformer
        tokens = pipe.tokenizer.model_max_length + int(manifest.task_config.get("max_sequence_length") or 256)
        x = torch.randn(2, model.config.in_channels, size // f, size // f)
        ctx = torch.randn(2, tokens, model.config.joint_attention_dim)
        pooled = torch.randn(2, model.config.pooled_projection_dim)
        call = lambda: model(hidden_states=x, timestep=torch.tensor([500.0, 500.0]),  # noqa: E731
                             encoder_hidden_states=ctx, pooled_projections=pooled, return_dict=False)
    else:
        raise NotImplementedError(f"no FLOP count for {type(pipe).__name__}")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        call()
    del pipe, model, call
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
    parser.add_argument("--no-t5", action="store_true", help="SD3/SD3.5: without the T5 encoder (export --no-t5).")
    parser.add_argument("--no-peak-memory", action="store_true", help="Skip the one-image peak-RSS subprocesses.")
    parser.add_argument("--reuse", action="store_true",
                        help="Take the pick and report an earlier run left in WORK/best instead of optimizing again.")
    args = parser.parse_args(argv)

    from enginekit.export.diffusion.sources import ARCHITECTURES

    config = PipelineOptimizeConfig(
        backends=tuple(args.backends.split(",")) if args.backends else None,
        precisions=tuple(args.precisions.split(",")), min_psnr=TARGET_PSNR, size=args.size, steps=args.steps,
        prompts=HELD_OUT_PROMPTS[: args.prompts], seeds=tuple(int(s) for s in args.seeds.split(",")),
        without_t5=args.no_t5)
    started = time.monotonic()
    log = lambda msg: print(f"[{time.monotonic() - started:7.0f}s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if args.reuse:
        try:
            report = json.loads((args.work / "best" / "report.json").read_text())
        except (OSError, ValueError) as exc:
            print(f"--reuse: no readable {args.work / 'best' / 'report.json'} from an earlier run ({exc})")
            return 2
        log(f"reusing the pick and report of an earlier run in {args.work / 'best'}")
    else:
        try:
            report = optimize_pipeline(args.model, args.work / "best", config,
                                       random_weights=args.model in ARCHITECTURES, work_dir=args.work / "run",
                                       overwrite=True, on_step=log)
        except FidelityError as exc:
            print(exc)
            print(f"TARGET MISSED: no candidate kept image PSNR >= {TARGET_PSNR} dB")
            return 1
    best = next(oc for oc in report["candidates"] if oc["status"] == "picked")
    hw = report["hardware"]
    # Peak memory first, while this process holds no model: each side alone in a child.
    memory: list[dict[str, Any]] = []
    if not args.no_peak_memory:
        for side in ("diffusers", best["candidate"]["backend"]):
            log(f"peak memory: one image by {side} alone in a subprocess")
            memory.append(peak_memory(side, args.work / "best", report["size"], report["steps"],
                                      report["held_out"]["prompts"][0], report["baseline"]["threads"]))
            log(f"  {memory[-1]}")
    log("counting the denoiser's FLOPs on diffusers' module")
    try:
        flops = unet_flops(read_manifest(args.work / "best"), report["size"])
    except NotImplementedError as exc:
        log(f"  {exc}: no arithmetic floor")
        flops = None
    ghz = clock_ghz()
    cores = int(hw.get("physical_cores") or 1)
    per_cycle = flops_per_cycle(hw.get("flags") or [])
    precision = _compute_precision(best["candidate"], hw.get("flags") or [])
    step_ms = best["timing"]["step_ms"]
    unet_ms = best["timing"]["components_ms"].get(report["denoiser"])
    floor: dict[str, Any] = {"unet_gflop_per_step": flops / 1e9 if flops else None, "clock_ghz": ghz,
                             "cores": cores, "compute_precision": precision, "assumed_flops_per_cycle": per_cycle}
    if ghz and flops:
        for p, (n, _) in per_cycle.items():
            floor[f"floor_ms_{p}"] = flops / (cores * ghz * 1e9 * n) * 1e3
        floor["pick_vs_floor"] = step_ms / floor[f"floor_ms_{precision}"]
    floor["pick_unet_tflops"] = flops / (unet_ms / 1e3) / 1e12 if unet_ms and flops else None
    floor["unet_share_of_step"] = unet_ms / step_ms if unet_ms else None
    speedup, psnr = best["speedup_step"], best["fidelity"]["psnr_db_min"]
    met = speedup >= TARGET_SPEEDUP and psnr >= TARGET_PSNR
    result = {"target": {"speedup_step": TARGET_SPEEDUP, "psnr_db": TARGET_PSNR, "met": met},
              "picked": report["picked"], "speedup_step": speedup, "psnr_db_min": psnr, "floor": floor,
              "peak_memory": memory,
              "baseline": report["baseline"], "report": str(args.work / "best" / "report.md"),
              "seconds": time.monotonic() - started}
    (args.work / "targets.json").write_text(json.dumps({"result": result, "report": report}, indent=2, default=str))

    print(f"# optimize {args.model} at {report['size']}x{report['size']}, batch 1 + CFG, {report['steps']} steps; "
          f"{hw.get('cpu_model')}, {hw.get('logical_cores')} logical cores")
    print(table_text(report))
    print()
    print(f"pick: {report['picked']}: {speedup:.2f}x faster per step than diffusers eager fp32 "
          f"({step_ms:.0f} vs {report['baseline']['step_ms']:.0f} ms), worst image PSNR {psnr:.2f} dB -> "
          + ("TARGET MET" if met else f"TARGET MISSED (needs >= {TARGET_SPEEDUP}x at >= {TARGET_PSNR} dB)")
          + ("" if args.model == "sd15" else f" (the SD 1.5 target's bar, applied to {args.model})"))
    denoiser = report["denoiser"]
    if flops:
        print(f"{denoiser} at {report['size']}² with CFG: {flops / 1e9:.1f} GFLOP per step (torch.utils.flop_counter)")
    if ghz and flops:
        print(f"peak: {cores} cores x {ghz:.2f} GHz x FLOPs/cycle/core "
              + ", ".join(f"{p} {n} ({why})" for p, (n, why) in per_cycle.items()))
        print("arithmetic floor per step: " + ", ".join(f"{p} {floor[f'floor_ms_{p}']:.1f} ms" for p in per_cycle)
              + f"; the pick computes in {precision}: {floor['pick_vs_floor']:.1f}x its floor")
    else:
        print("no arithmetic floor: " + ("the OS reports no clock" if flops else f"no FLOP count for the {denoiser}"))
    for m in memory:
        who = "diffusers eager fp32" if m["side"] == "diffusers" else f"the pick ({m['side']})"
        if "error" in m or m.get("peak_rss_bytes") is None:
            print(f"peak memory, {who}: not measured ({m.get('error') or 'no VmHWM on this platform'})")
        else:
            print(f"peak memory, {who}, one image alone in its process: {m['peak_rss_bytes'] / 2**30:.2f} GiB RSS "
                  f"(step {m['step_ms']:.0f} ms, image {m['image_ms']:.0f} ms)")
    if unet_ms:
        achieved = f", {floor['pick_unet_tflops']:.2f} TFLOP/s achieved" if floor["pick_unet_tflops"] else ""
        print(f"the pick's {denoiser} call: {unet_ms:.0f} ms ({floor['unet_share_of_step']:.0%} of the step){achieved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
