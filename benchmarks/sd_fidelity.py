"""Whole-image fidelity of pipeline engines against diffusers, on the same latents.

Rebuilds the diffusers pipeline of the artifacts' weights (seeded built-ins and
``--random-weights`` families from their provenance), generates one image with it,
then the same prompt, latents, scheduler and steps with every artifact given, and
prints PSNR (dB) and max abs error per artifact. All artifacts must come from the
same export. Run:

    python -m benchmarks.sd_fidelity out/sd15-onnx out/sd15-ov --size 512 --steps 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import enginekit
from enginekit.bench.pipeline import DIFFUSERS_SCHEDULERS, _diffusers_pipeline
from enginekit.fidelity import psnr
from enginekit.hardware import fingerprint
from enginekit.manifest import read_manifest

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="euler", choices=["euler", "ddim", "dpm++2m"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    import diffusers
    import torch

    manifest = read_manifest(args.artifacts[0])
    pipe = _diffusers_pipeline(manifest)
    cls, overrides = DIFFUSERS_SCHEDULERS[args.scheduler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latents = np.random.default_rng(args.seed).standard_normal(
        (1, pipe.vae.config.latent_channels, args.size // f, args.size // f), dtype=np.float32)
    call = dict(negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=args.guidance,
                height=args.size, width=args.size)
    started = time.perf_counter()
    with torch.inference_mode():
        ref = pipe(PROMPT, latents=torch.from_numpy(latents), output_type="np", **call).images
    rows = [{"artifact": "diffusers (PyTorch fp32)", "seconds": round(time.perf_counter() - started, 1)}]
    del pipe
    for path in args.artifacts:
        ours = enginekit.load(path, device="cpu")
        started = time.perf_counter()
        got = ours(PROMPT, latents=latents, scheduler=args.scheduler, output_type="np", **call).images
        seconds = time.perf_counter() - started
        kind = read_manifest(path).kind
        rows.append({"artifact": str(path), "kind": kind, "backend": ours.backend, "psnr_db": round(psnr(ref, got), 2),
                     "max_abs": float(np.abs(ref.astype(np.float64) - got).max()), "seconds": round(seconds, 1)})
        ours.close()
    hw = fingerprint()
    print(f"# {manifest.family} at {args.size}x{args.size}, {args.steps} {args.scheduler} steps, CFG {args.guidance}, "
          f"same latents; {hw.get('cpu_model', '?')}, {hw.get('logical_cores', '?')} cores")
    print("| engine | backend | PSNR vs diffusers (dB) | max abs | seconds |")
    print("|:---|:---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['artifact']} | {r.get('backend', 'pytorch')} | {r.get('psnr_db', '-')} | "
              f"{r.get('max_abs', 0):.2e} | {r['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
