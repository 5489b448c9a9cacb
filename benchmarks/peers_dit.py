"""enginekit against OpenVINO GenAI on a transformer (DiT) pipeline, TaylorSeer off and on, same IRs.

SD3/SD3.5 and FLUX: OpenVINO GenAI's ``Text2ImagePipeline`` turns TaylorSeer Lite on by default for
these families (interval 3, full steps before 6 and in the last 2). optimum-intel's export of a
full-size SD3.5 or FLUX does not fit in 24 GB, so both sides run enginekit's fp16 IRs written in
GenAI's folder layout (``compile -b openvino --precision fp16 --genai``): GenAI's C++ pipeline and
enginekit's runtime on the very same files (reshaped static at the size, as GenAI reshapes them at
load: ``compile --height S --width S --batch 1``), each with its step cache off and on (enginekit's
``taylorseer:3,before=6,after=-2``: GenAI's schedule), against diffusers eager fp32 on the same
weights and initial latents (torch's CPU generator at ``--seed``; GenAI's ``TorchGenerator``
draws the same numbers). The protocol is :mod:`benchmarks.peers`'s: a warm-up, then ``--repeats``
pairs of a 1-step and an S-step image; a step is (T_S - T_1) / (S - 1), which with a cache is the
mean over steps 2..S. S defaults to the family's own step count (28 for SD3), where GenAI's
default cache does its work. ``--without-t5`` builds SD3 without its T5 encoder (as diffusers
allows): a full-size T5-XXL in fp32 does not fit beside the rest for diffusers' reference.

    .venv/bin/python -m benchmarks.peers_dit --work /tmp/dit --model sd35-medium --without-t5
    .venv/bin/python -m benchmarks.peers_dit --work /tmp/dit-smoke --model tiny-sd3 --size 64 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.peers import (CHILD, NEGATIVE, PROMPT, _genai_folder, build_model, ensure_peer_venv, run_child,
                              stage_runner)

#: GenAI's TaylorSeerCacheConfig defaults, and the same schedule in enginekit's spelling.
GENAI_TAYLORSEER = {"cache_interval": 3, "disable_cache_before_step": 6, "disable_cache_after_step": -2}
ENGINEKIT_TAYLORSEER = "taylorseer:3,before=6,after=-2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--model", default="sd35-medium", help="An SD3/SD3.5 architecture enginekit builds seeded.")
    parser.add_argument("--without-t5", action="store_true", help="Build SD3 without its T5 encoder.")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--max-sequence-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-repeats", type=int, default=1,
                        help="diffusers' timed pairs (its image is the reference; its speed is context).")
    parser.add_argument("--peer-venv", type=Path, default=None, help="default: WORK/peers-venv")
    parser.add_argument("--redo", default="", help="Comma-separated stages to run again.")
    args = parser.parse_args(argv)

    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    state_path = work / "peers-dit.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    redo = set(filter(None, args.redo.split(",")))
    call = {"max_sequence_length": args.max_sequence_length}
    common = {"prompt": PROMPT, "negative": NEGATIVE, "size": args.size, "steps": args.steps,
              "guidance": args.guidance, "seed": args.seed, "repeats": args.repeats, "out_dir": str(work), "call": call}
    state["common"] = {**common, "model": args.model, "without_t5": args.without_t5}

    stage = stage_runner(state, state_path, redo)

    from enginekit.hardware import fingerprint

    hw = fingerprint()
    state["hardware"] = {k: hw.get(k) for k in ("cpu_model", "physical_cores", "logical_cores")}
    model, folder = work / "model", work / "ov-enginekit"
    stage("model", lambda: (build_model(args.model, model, args.seed, args.without_t5), {"folder": str(model)})[1])
    python = str(ensure_peer_venv(args.peer_venv or work / "peers-venv"))

    def child(role: str, label: str, **extra: Any) -> dict[str, Any]:
        payload = {**common, "model": str(model), "ov_model": str(folder), "label": label, **extra}
        out = run_child([python, str(CHILD), role, json.dumps(payload)], work / "logs" / f"{label}.log")
        if "image_path" in out:  # the child names its image after its role: keep each label's own
            target = work / f"image-{label}.npy"
            Path(out["image_path"]).replace(target)
            out["image_path"] = str(target)
        return out

    static = work / "ov-static"

    def compile_static() -> dict[str, Any]:
        """The same IRs reshaped static at the size (CFG's two rows), as GenAI reshapes them at load."""
        from enginekit.manifest import read_manifest
        from enginekit.registry import task_class

        manifest = read_manifest(folder)
        dims = task_class(manifest.task).compile_options(manifest, "openvino", "fp32", args.size, args.size, 1)["dims"]
        denoiser = dims[manifest.task_config["denoiser"]]  # the T5 tokens this run asks for, not the default
        denoiser["sequence"] += args.max_sequence_length - int(manifest.task_config["max_sequence_length"])
        cmd = [sys.executable, "-m", "enginekit.app.cli", "compile", str(folder), "-b", "openvino", "--height",
               str(args.size), "--width", str(args.size), "--batch", "1", "--option", f"dims={json.dumps(dims)}",
               "-o", str(static), "--overwrite"]
        with open(work / "logs" / "static.log", "w") as log:
            code = subprocess.run(cmd, stdout=log, stderr=log).returncode
        return {"artifact": str(static)} if code == 0 else {"error": f"compile exit {code}: see logs/static.log"}

    def engine(label: str, cache: str) -> dict[str, Any]:
        payload = {**common, "artifact": str(static), "cache": cache, "label": label,
                   "call": {**call, "negative_prompt": NEGATIVE}}
        return {**run_child([sys.executable, "-m", "benchmarks.peers", "--work", str(work), "--child", "1",
                             "--child-args", json.dumps(payload)], work / "logs" / f"{label}.log"), "cache": cache}

    stage("diffusers", lambda: child("diffusers", "diffusers", repeats=args.reference_repeats))
    stage("export-genai", lambda: _genai_folder(model, folder, work, work / "logs", True))
    stage("genai", lambda: child("genai", "genai", taylorseer=None))
    stage("genai-taylorseer", lambda: child("genai", "genai-taylorseer", taylorseer=GENAI_TAYLORSEER))
    stage("static", compile_static)
    stage("enginekit", lambda: engine("enginekit", "none"))
    stage("enginekit-taylorseer", lambda: engine("enginekit-taylorseer", ENGINEKIT_TAYLORSEER))
    state_path.write_text(json.dumps(state, indent=1, default=str))
    print(render(state))
    return 0


def render(state: dict[str, Any]) -> str:
    import numpy as np

    from enginekit.fidelity import psnr

    st, c, hw = state["stages"], state["common"], state.get("hardware") or {}
    ref = np.load(st["diffusers"]["image_path"]) if "image_path" in st.get("diffusers", {}) else None
    rows = {"diffusers": "diffusers eager fp32", "genai": "OpenVINO GenAI, TaylorSeer off",
            "genai-taylorseer": "OpenVINO GenAI, TaylorSeer on (its default: 3, before 6, after -2)",
            "enginekit": "enginekit, the same IRs static, cache none",
            "enginekit-taylorseer": f"enginekit, the same IRs static, {ENGINEKIT_TAYLORSEER}"}
    peer = {"enginekit": "genai", "enginekit-taylorseer": "genai-taylorseer"}
    lines = [f"# {c['model']}{' without T5' if c.get('without_t5') else ''}, {c['size']}x{c['size']}, CFG "
             f"{c['guidance']}, {c['steps']} steps; step = (T{c['steps']} - T1) / {c['steps'] - 1}, median of "
             f"{c['repeats']}; GenAI and enginekit on the same fp16 IRs (compile --genai); "
             f"{hw.get('cpu_model')}, {hw.get('physical_cores')} cores", "",
             "| path | s / step | image s | PSNR vs diffusers | vs GenAI, same caching: step | image |",
             "|---|---|---|---|---|---|"]
    for key, name in rows.items():
        r = st.get(key)
        if r is None:
            continue
        if "step_s" not in r:
            lines.append(f"| {name} | failed: {r.get('error')} | | | | |")
            continue
        fid = psnr(ref, np.load(r["image_path"])) if ref is not None and key != "diffusers" else None
        other = st.get(peer.get(key, ""), {})
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['image_s']:.2f} | "
                     + (f"{fid:.1f} dB" if fid is not None else "reference") + " | "
                     + (f"{other['step_s'] / r['step_s']:.2f}x | {other['image_s'] / r['image_s']:.2f}x |"
                        if "step_s" in other else "| |"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
