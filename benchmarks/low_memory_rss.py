"""Peak resident memory of ``generate`` with and without ``--low-memory``, on both backends.

A FLUX-shaped pipeline wider than the built-in tiny twin (T5 d_model 1024 x 8 layers, a 768-wide
transformer with 2 double and 4 single blocks: about 180 M parameters, 0.7 GB in fp32) is built
with seeded weights, exported with its weights as external data (as every real-size model is)
and compiled for ONNX Runtime and OpenVINO. Each configuration then generates one image in a
fresh process of its own, which prints its ``VmHWM`` (the process's own high-water mark: imports,
engines, activations) and each stage's peak (``/proc/self/clear_refs`` resets the mark per stage),
for one 512x512 image in 2 steps. ``compile`` has filled OpenVINO's model cache, as on a deployed box.

    python -m benchmarks.low_memory_rss --work /tmp/lowmem          # minutes: export + compiles
    python -m benchmarks.low_memory_rss --work /tmp/lowmem --skip-build

``--session-options`` also runs the low-memory ONNX Runtime pipeline under each candidate session
setting, with a digest of its image (what chose the settings in ``runtimes/onnxruntime.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

#: The wide twin: tiny-flux's configs with these values changed, per component.
WIDE = {
    "text_encoder_2": {"d_model": 1024, "d_ff": 2816, "d_kv": 64, "num_heads": 16, "num_layers": 8},
    "transformer": {"attention_head_dim": 64, "num_attention_heads": 12, "num_layers": 2, "num_single_layers": 4,
                    "axes_dims_rope": [16, 24, 24], "joint_attention_dim": 1024},
}

#: One generation in a fresh process: argv = artifact, low_memory (0/1), runs. Prints JSON.
_CHILD = r"""
import json, sys, time
import enginekit
from enginekit.memory import StagePeaks, vm_hwm_bytes
art, low, runs = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
pipe = enginekit.load(art, device="cpu", low_memory=low)
before = vm_hwm_bytes() or 0  # imports and load(); each stage then resets the mark and reads its own
for i in range(runs):
    pipe.stages = StagePeaks() if i == runs - 1 else None
    t0 = time.perf_counter()
    pipe("a red fox in the snow", num_inference_steps=2, height=512, width=512, seed=0, output_type="np")
stages = {s.name: s.bytes for s in pipe.stages.stages.values()}
print(json.dumps({"peak_rss_bytes": max([before, *stages.values()]), "stages": stages,
                  "seconds": time.perf_counter() - t0}))
"""

#: The low-memory ONNX Runtime pipeline under candidate session settings: argv = artifact,
#: settings as JSON. Prints each stage's peak and a digest of the image (the same image or not).
_SESSION = r"""
import hashlib, json, sys
import enginekit
from enginekit.memory import StagePeaks
from enginekit.runtimes import onnxruntime as backend
art, settings = sys.argv[1], json.loads(sys.argv[2])
def options(so):
    for key, value in settings.items():
        if key in ("enable_cpu_mem_arena", "enable_mem_pattern"):
            setattr(so, key, bool(value))
        else:
            so.add_session_config_entry(key, str(value))
backend._low_memory_options = options
pipe = enginekit.load(art, device="cpu", low_memory=True)
pipe.stages = StagePeaks()
image = pipe("a red fox in the snow", num_inference_steps=2, height=512, width=512, seed=0, output_type="np").images
print(json.dumps({"stages": {s.name: s.bytes for s in pipe.stages.stages.values()},
                  "image": hashlib.sha256(image.tobytes()).hexdigest()[:12]}))
"""

SETTINGS = {
    "ONNX Runtime's defaults": {},
    "mem pattern off (chosen)": {"enable_mem_pattern": 0},
    "arena off": {"enable_cpu_mem_arena": 0},
    "arena and mem pattern off": {"enable_cpu_mem_arena": 0, "enable_mem_pattern": 0},
    "device allocator for initializers": {"session.use_device_allocator_for_initializers": 1},
    "mem pattern off, prepacking off": {"enable_mem_pattern": 0, "session.disable_prepacking": 1},
}


def build(work: Path) -> dict[str, Path]:
    """Export the wide twin (weights as external data) and compile it for both backends."""
    from enginekit.api import compile_artifact
    from enginekit.export.diffusion import sd
    from enginekit.export.diffusion.sources import _build_seeded, config_dir

    configs = work / "wide-flux-configs"
    if configs.exists():
        shutil.rmtree(configs)
    shutil.copytree(config_dir("tiny-flux"), configs)
    for comp, changes in WIDE.items():
        path = configs / comp / "config.json"
        cfg = json.loads(path.read_text())
        cfg.update(changes)
        path.write_text(json.dumps(cfg, indent=2))
    onnx_dir = work / "wide-flux"
    if not onnx_dir.exists():
        sd._EXTERNAL_DATA_BYTES = 1 << 20  # weights beside the graph, as a real-size export writes them
        src = _build_seeded(configs, "flux", seed=0)
        sd.export_pipeline(src, onnx_dir, sd.PipelineExportOptions(image_check=False))
    out = {"onnx": onnx_dir}
    for backend in ("onnxruntime", "openvino"):
        target = work / f"wide-flux-{backend}"
        if not target.exists():
            compile_artifact(onnx_dir, backend, target)
        out[backend] = target
    return out


def _child(code: str, *argv: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the measuring process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--session-options", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    arts = build(args.work) if not args.skip_build else {
        "onnx": args.work / "wide-flux", **{b: args.work / f"wide-flux-{b}" for b in ("onnxruntime", "openvino")}}
    gib = 2**30
    print("| backend | load | peak RSS | text encoding | denoising | decode | image (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for backend in ("onnxruntime", "openvino"):
        for low in (False, True):
            got = _child(_CHILD, str(arts[backend]), "1" if low else "0", "1")
            st = got["stages"]
            print(f"| {backend} | {'low_memory' if low else 'default'} | {got['peak_rss_bytes'] / gib:.2f} GiB | "
                  + " | ".join(f"{st.get(k, 0) / gib:.2f} GiB" for k in ("text encoding", "denoising", "decode"))
                  + f" | {got['seconds']:.1f} |", flush=True)
    if args.session_options:
        print("\n| ONNX Runtime settings (low_memory) | text encoding | denoising | decode | image |")
        print("|---|---:|---:|---:|---|")
        for name, settings in SETTINGS.items():
            got = _child(_SESSION, str(arts["onnxruntime"]), json.dumps(settings))
            st = got["stages"]
            print(f"| {name} | " + " | ".join(f"{st.get(k, 0) / gib:.2f} GiB" for k in
                                              ("text encoding", "denoising", "decode"))
                  + f" | {got['image']} |", flush=True)


if __name__ == "__main__":
    main()
