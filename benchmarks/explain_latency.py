"""Does the plain classifier keep its speed now that it can explain? And what does explaining cost?

Explanations read a second graph of the same engine file, opened only when asked
(:mod:`enginekit.runtimes.attention_taps`); ``predict`` runs the engine as before. This script
measures that, on artifacts it builds in WORK (if missing):

- ``tiny``: the tests' tiny timm ViT (32x32, patch 8, 2 layers) with seeded weights;
- ``small``: ``timm:vit_small_patch16_384 --random-weights`` (the seed detector's shape);

each exported to ONNX and compiled for ONNX Runtime and OpenVINO (fp32). Per artifact, in
rounds that alternate the two interpreters, a child process loads it and times batch-1
``clf.predict(image)`` (preprocessing included, after warm-up):

- ``before``: another interpreter whose enginekit predates explanations (``--before``, e.g.
  ``/work/main/.venv/bin/python``), on the same artifact;
- ``after``: this checkout, plain;
- ``after, explained``: this checkout, after one ``explain`` call (the attention graph loaded
  beside the plain one), predict timed again; and ``explain`` itself (rollout, and occlusion
  with the default 8x8 squares).

Medians of each round's median; the spread is the rounds' min-max. Run::

    .venv/bin/python -m benchmarks.explain_latency out/explain --before /work/main/.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def _time(fn: Any, runs: int) -> float:
    """Median wall ms of ``fn()`` over ``runs`` calls."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def child(artifact: str, runs: int, explain: bool) -> dict[str, Any]:
    """One process's numbers (imports only the interpreter's own enginekit)."""
    import numpy as np
    from PIL import Image

    import enginekit

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    clf = enginekit.load(artifact, device="cpu")
    for _ in range(5):
        clf.predict(image)
    out = {"predict_ms": _time(lambda: clf.predict(image), runs)}
    if explain:
        clf.explain(image)  # opens the attention graph
        for _ in range(3):
            clf.predict(image)
        out["predict_after_explain_ms"] = _time(lambda: clf.predict(image), runs)
        out["rollout_ms"] = _time(lambda: clf.explain(image), max(3, runs // 5))
        out["occlusion_ms"] = _time(lambda: clf.explain(image, "occlusion"), 1)
    clf.close()
    return out


def build(work: Path) -> dict[str, Path]:
    """The four (six) artifacts, built once."""
    from enginekit.api import compile_artifact
    from enginekit.export.vit import export_classifier

    arts: dict[str, Path] = {}
    sources = {"tiny": None, "small": "timm:vit_small_patch16_384"}
    for name, spec in sources.items():
        onnx_dir = work / f"{name}-onnx"
        if not onnx_dir.exists():
            if spec is None:
                spec = str(_tiny_source(work / "tiny-src"))
                export_classifier(spec, onnx_dir, on_step=print)
            else:
                export_classifier(spec, onnx_dir, random_weights=True, on_step=print)
        for backend in ("onnxruntime", "openvino"):
            out = work / f"{name}-{backend}"
            if not out.exists():
                compile_artifact(onnx_dir, backend, out)
            arts[f"{name}-{backend}"] = out
    return arts


def _tiny_source(folder: Path) -> Path:
    import timm
    import torch
    from timm.models import save_for_hf

    if not folder.exists():
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, **TINY_ARGS)
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
        save_for_hf(model, folder, model_args=TINY_ARGS, safe_serialization=True)
    return folder


def _run_child(python: str, artifact: Path, runs: int, explain: bool) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--child", str(artifact), "--runs", str(runs)]
    if explain:
        cmd.append("--explain")
    # Run from / so each interpreter imports its own installed enginekit, not this checkout; no
    # bytecode written into the other checkout; OpenVINO's model cache kept beside the artifacts.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "ENGINEKIT_CACHE_DIR": str(artifact.parent / "cache")}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd="/", check=False, env=env)
    if done.returncode:
        raise SystemExit(f"child failed ({python} {artifact}): {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", nargs="?", type=Path)
    parser.add_argument("--before", help="an interpreter whose enginekit predates explanations")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--child")
    parser.add_argument("--explain", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.runs, args.explain)))
        return
    if args.work is None:
        parser.error("give WORK, the folder for the artifacts")
    args.work.mkdir(parents=True, exist_ok=True)
    arts = build(args.work)
    from enginekit.hardware import fingerprint

    report: dict[str, Any] = {"cpu": fingerprint().get("cpu_model"), "rounds": args.rounds, "runs": args.runs, "results": {}}
    for name, path in arts.items():
        rounds: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            if args.before:
                rounds.setdefault("before predict_ms", []).append(
                    _run_child(args.before, path, args.runs, False)["predict_ms"])
            for key, value in _run_child(sys.executable, path, args.runs, True).items():
                rounds.setdefault(f"after {key}", []).append(value)
        report["results"][name] = {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3),
                                       "max": round(max(v), 3)} for k, v in rounds.items()}
        print(name, json.dumps(report["results"][name]), flush=True)
    (args.work / "explain_latency.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
