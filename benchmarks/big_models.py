"""Full-size FLUX.1 and SD3.5 Large on a small CPU box: streamed, compressed export, compile and a
512x512 image, each stage in its own process with its peak RSS, against the issue's RSS budgets.

Stages (each a child process under :func:`benchmarks.run_watched`: its peak resident memory is the
process tree's, polled every 0.5 s, and the child is killed past ``--rss-limit-gb``):

1. ``export``: ``enginekit export MODEL --random-weights --streaming --weight-format F`` (seeded
   weights drawn per tensor, compressed as they are drawn: never a float copy in memory or on disk);
2. ``compile``: ``enginekit compile ... -b BACKEND`` for each backend asked;
3. ``generate``: ``enginekit.load(..., low_memory=True)`` and one image (the prompt encoded, then the
   encoders released; the VAE loaded for the decode), timed per denoising step;
4. the arithmetic floor of one denoising step: the transformer's FLOPs counted by PyTorch's
   ``FlopCounterMode`` on the meta device (nothing allocated) at the image's size, over this CPU's
   peak rate per precision (cores x GHz x FLOPs per cycle; the unit named).

Writes ``<work>/big_models.json`` and prints a markdown table. Commands (this 2-core box; hold the
quiet lock so nothing else runs)::

    flock /tmp/enginekit-quiet.lock python -m benchmarks.big_models flux-schnell --weight-format int4 --work /tmp/fx
    flock /tmp/enginekit-quiet.lock python -m benchmarks.big_models flux-dev --weight-format int8 --work /tmp/fd \\
        --rss-limit-gb 20
    flock /tmp/enginekit-quiet.lock python -m benchmarks.big_models sd35-large --weight-format int8 --work /tmp/l \\
        --rss-limit-gb 20
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from benchmarks import run_watched

MODELS = ("flux-schnell", "flux-dev", "sd35-large", "sd35-medium", "sd3-medium", "sdxl", "sd15", "tiny-flux", "tiny-sd35")
#: The issue's budgets: FLUX.1-schnell int4 under 16 GiB a stage; FLUX.1-dev and SD3.5 Large int8 under 20.
BUDGET_GIB = {"flux-schnell": 16.0, "flux-dev": 20.0, "sd35-large": 20.0}

_GENERATE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import enginekit
    from enginekit.memory import StagePeaks, vm_hwm_bytes
    from enginekit.app.build import generate_images

    path, prompt, steps, size, low, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \\
        sys.argv[5] == "1", sys.argv[6]
    stamps = []
    stages = StagePeaks()
    started = time.perf_counter()
    paths, result = generate_images(path, prompt, out, device="cpu", low_memory=low, stages=stages, seed=0,
                                    num_inference_steps=steps, height=size, width=size,
                                    on_step=lambda i, t, lat: stamps.append(time.perf_counter()))
    total = time.perf_counter() - started
    denoise = stages.stages.get("denoising")
    steps_s = np.diff(stamps).tolist()
    print(json.dumps({"seconds": total, "images": [str(p) for p in paths],
                      "stages": {s.name: {"peak_bytes": s.bytes, "how": s.how, "seconds": s.seconds}
                                 for s in stages.stages.values()},
                      "step_seconds": steps_s, "first_step_seconds": (stamps[0] - started) if stamps else None,
                      "process_peak_bytes": vm_hwm_bytes()}))
""")


def run_stage(name: str, cmd: list[str], limit_bytes: int, log: Path) -> dict[str, Any]:
    """Run ``cmd`` as a child under the watchdog (:func:`benchmarks.run_watched`): its wall time,
    peak tree RSS, return code and output; killed when the tree passes ``limit_bytes``."""
    out = log.with_suffix(".out")
    with open(log, "w") as err, open(out, "w") as sink:
        run = run_watched(cmd, limit_bytes, stdout=sink, stderr=err, poll_s=0.5)
    text = log.read_text()
    print(f"{name}: rc {run.returncode}, {run.seconds:.0f} s, peak {run.peak_rss_bytes / 2**30:.2f} GiB"
          + (f" ({run.killed})" if run.killed else ""), file=sys.stderr, flush=True)
    # The command's own report of its process's high-water mark (VmHWM), where it prints one.
    said = re.findall(r"peak RSS ([0-9.]+) GiB", text)
    return {"stage": name, "command": " ".join(cmd), "rc": run.returncode, "seconds": round(run.seconds, 1),
            "peak_rss_bytes": run.peak_rss_bytes, "process_vmhwm_gib": float(said[-1]) if said else None,
            "killed_past_limit": run.killed is not None, "stdout": out.read_text().strip()[-4000:],
            "stderr_tail": text[-3000:] if run.returncode else text[-600:]}


def step_flops(model: str, size: int) -> float:
    """FLOPs of one denoiser call at ``size``² as the pipeline makes it (FLUX: one row, its T5 length;
    SD3: two rows for CFG, 77 + 256 tokens), counted on the meta device."""
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from enginekit.export.diffusion.sources import config_dir

    cfg = json.loads((config_dir(model) / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    lat = size // 8
    with torch.device("meta"):
        if "flux" in model:
            net = diffusers.FluxTransformer2DModel.from_config(cfg)
            text = 512 if model == "flux-dev" else 256
            tokens = (lat // 2) ** 2
            ids = torch.zeros(tokens, 3)
            kwargs = dict(hidden_states=torch.randn(1, tokens, cfg["in_channels"]),
                          encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"]),
                          pooled_projections=torch.randn(1, cfg["pooled_projection_dim"]),
                          timestep=torch.ones(1), img_ids=ids, txt_ids=torch.zeros(text, 3), return_dict=False)
            if cfg.get("guidance_embeds"):
                kwargs["guidance"] = torch.ones(1)
        else:
            net = diffusers.SD3Transformer2DModel.from_config(cfg)
            kwargs = dict(hidden_states=torch.randn(2, cfg["in_channels"], lat, lat),
                          encoder_hidden_states=torch.randn(2, 77 + 256, cfg["joint_attention_dim"]),
                          pooled_projections=torch.randn(2, cfg["pooled_projection_dim"]),
                          timestep=torch.ones(2), return_dict=False)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            net(**kwargs)
    return float(counter.get_total_flops())


def floors(flops: float) -> dict[str, Any]:
    """Seconds one step takes at this CPU's peak per precision."""
    from benchmarks.pipeline_targets import clock_ghz, flops_per_cycle
    from enginekit.hardware import fingerprint

    hw = fingerprint()
    ghz = clock_ghz() or 0.0
    cores = int(hw.get("physical_cores") or 1)
    out: dict[str, Any] = {"cpu": hw["cpu_model"], "cores": cores, "ghz": ghz, "step_gflop": flops / 1e9}
    for precision, (per_cycle, unit) in flops_per_cycle(list(hw.get("flags") or [])).items():
        rate = cores * ghz * 1e9 * per_cycle
        out[precision] = {"floor_s": flops / rate if rate else None, "unit": unit}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=MODELS)
    ap.add_argument("--weight-format", default="int4", choices=("int4", "int8", "fp16", "fp32"))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--backends", default="openvino,onnxruntime")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None, help="default: the family's (schnell 4)")
    ap.add_argument("--prompt", default="a red fox in the snow")
    ap.add_argument("--rss-limit-gb", type=float, default=None, help="default: the model's budget, else 22")
    ap.add_argument("--skip", default="", help="comma-separated: export, compile, generate, floor")
    ap.add_argument("--clean", action="store_true",
                    help="remove each backend's engine (and its OpenVINO model-cache folder) once its image is "
                         "made: a full-size FLUX engine and its cache take 25 GB of disk each")
    args = ap.parse_args(argv)

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    budget = BUDGET_GIB.get(args.model)
    limit = int((args.rss_limit_gb or budget or 22.0) * 2**30)
    skip = set(filter(None, args.skip.split(",")))
    exe = [sys.executable, "-m", "enginekit.app.cli"]
    onnx_dir = work / f"{args.model}-{args.weight_format}"
    steps = args.steps or (4 if args.model in ("flux-schnell", "tiny-flux") else 28)
    report: dict[str, Any] = {"model": args.model, "weight_format": args.weight_format, "size": args.size,
                              "steps": steps, "budget_gib": budget, "stages": []}
    results = work / "big_models.json"
    if results.exists():  # a run resumed with --skip keeps the stages it does not repeat
        earlier = json.loads(results.read_text())
        if all(earlier.get(k) == report[k] for k in ("model", "weight_format", "size", "steps")):
            report["stages"] = earlier.get("stages", [])
            report["floor"] = earlier.get("floor")

    def record(stage: dict[str, Any]) -> None:
        report["stages"] = [s for s in report["stages"] if s["stage"] != stage["stage"]] + [stage]
        save()

    def save() -> None:
        results.write_text(json.dumps(report, indent=1))

    if "export" not in skip:
        cmd = [*exe, "export", args.model, "--random-weights", "--streaming", "--weight-format", args.weight_format,
               "--group-size", str(args.group_size), "-o", str(onnx_dir), "--overwrite"]
        record(run_stage("export", cmd, limit, work / "export.log"))
    for backend in [b for b in args.backends.split(",") if b]:
        engine = work / f"{onnx_dir.name}-{backend}"
        if "compile" not in skip:
            cmd = [*exe, "compile", str(onnx_dir), "-b", backend, "-o", str(engine), "--overwrite"]
            record(run_stage(f"compile {backend}", cmd, limit, work / f"compile-{backend}.log"))
        if "generate" not in skip:
            cmd = [sys.executable, "-c", _GENERATE, str(engine), args.prompt, str(steps), str(args.size), "1",
                   str(work / f"{backend}.png")]
            stage = run_stage(f"generate {backend}", cmd, limit, work / f"generate-{backend}.log")
            try:
                stage["result"] = json.loads(stage["stdout"].splitlines()[-1])
            except (IndexError, ValueError):
                stage["result"] = None
            record(stage)
        if args.clean:
            _remove_engine(engine)
    if "floor" not in skip:
        report["floor"] = floors(step_flops(args.model, args.size))
        save()
    print(table(report))
    return 0 if all(s["rc"] == 0 for s in report["stages"]) else 1


def _remove_engine(engine: Path) -> None:
    """Delete an engine folder and its OpenVINO model-cache folder (keyed by its manifest)."""
    import shutil

    if (engine / "manifest.json").exists():
        from enginekit.manifest import read_manifest
        from enginekit.runtimes.openvino_cache import cache_dir_for

        shutil.rmtree(cache_dir_for(read_manifest(engine)), ignore_errors=True)
    shutil.rmtree(engine, ignore_errors=True)


def table(report: dict[str, Any]) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    budget = report.get("budget_gib")
    lines = [f"{report['model']}, {report['weight_format']} ({report['size']}x{report['size']}, "
             f"{report['steps']} steps), budget {budget or '-'} GiB per stage", "",
             "| stage | wall | peak RSS (process tree) | within budget | notes |", "|---|---|---|---|---|"]
    for s in report["stages"]:
        notes = "killed past the limit" if s["killed_past_limit"] else ("" if s["rc"] == 0 else f"rc {s['rc']}")
        res = s.get("result") or {}
        if res.get("step_seconds"):
            per = res["step_seconds"]
            notes = (f"steps after the first: {sum(per) / len(per):.1f} s each; first step (with text encoding) "
                     f"{res['first_step_seconds']:.1f} s; image {res['seconds']:.0f} s")
        ok = "yes" if budget and s["rc"] == 0 and s["peak_rss_bytes"] < budget * 2**30 else ("no" if budget else "-")
        lines.append(f"| {s['stage']} | {s['seconds']:.0f} s | {gib(s['peak_rss_bytes'])} | {ok} | {notes} |")
    fl = report.get("floor")
    if fl:
        lines += ["", f"One step: {fl['step_gflop']:.0f} GFLOP; floor on {fl['cpu']} ({fl['cores']} cores, "
                      f"{fl['ghz']:.2f} GHz): " + ", ".join(
                          f"{p} {fl[p]['floor_s']:.2f} s ({fl[p]['unit']})" for p in ("fp32", "bf16", "int8")
                          if fl.get(p) and fl[p]["floor_s"])]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
