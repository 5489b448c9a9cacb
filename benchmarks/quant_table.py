"""Every quantization method on one model: fidelity, size and batch-1 latency, beside float.

For the model it exports (or reuses) a float ONNX artifact, runs each method of
every backend through ``quantize_artifact`` (so each result passed its fidelity
gate), compiles float and ONNX-kind results for OpenVINO too, and times batch 1 on
ONNX Runtime and OpenVINO in one run. Prints a markdown table.

Data: the built-in default calibrates on its training digits and is judged on the
360 held-out ones (accuracy). Any other model calibrates on crops of the two real
photographs scikit-learn ships (``sklearn.datasets.load_sample_images``), written as
a folder, and is judged on other crops (agreement and cosine with float).

Run::

    python -m benchmarks.quant_table --model default
    python -m benchmarks.quant_table --model timm:vit_small_patch16_384 --work out/quant-vit
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.app.demo import time_batch1

__all__ = ["write_photo_crops", "main"]


def write_photo_crops(out: Path, n: int, seed: int) -> Path:
    """``n`` seeded random crops of scikit-learn's two sample photos (:func:`photo_crops`), as JPEG files."""
    from enginekit.artifact import atomic_folder
    from enginekit.quant.data import photo_crops

    if out.exists():
        return out
    with atomic_folder(out) as tmp:
        for i, crop in enumerate(photo_crops(n, seed)):
            crop.save(tmp / f"{i:04d}.jpg", quality=92)
    return out


def _latency(path: Path, backend: str, runs: int) -> float | None:
    import enginekit

    try:
        with enginekit.load(path, device="cpu", backend=backend) as clf:
            x = np.random.default_rng(0).normal(size=(1, *clf.runner.inputs[0].shape[1:])).astype(np.float32)
            return time_batch1(lambda: clf.run_pixels(x), warmup=3, runs=runs)
    except Exception as exc:  # a backend that cannot run this kind of graph: say so in the table
        print(f"  {path.name} on {backend}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return None


def _size(path: Path) -> int:
    from enginekit.manifest import read_manifest

    return sum(f.size for c in read_manifest(path).components.values() for f in c.files)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from enginekit.api import compile_artifact
    from enginekit.export.vit import export_classifier
    from enginekit.manifest import read_manifest
    from enginekit.quant.api import QuantizeRequest, quantize_artifact
    from enginekit.quant.base import METHODS, QuantOptions

    work: Path = args.work
    onnx = work / "onnx"
    if not (onnx / "manifest.json").is_file():
        print(f"· export {args.model} -> {onnx}")
        export_classifier(args.model, onnx, random_weights=args.model.startswith("timm:"))
    if args.model == "default":
        calib, held = "builtin", None
    else:
        calib = str(write_photo_crops(work / "photos-calib", args.calibration_size, seed=0))
        held = str(write_photo_crops(work / "photos-held", args.eval_size, seed=1))
    rows: list[dict[str, Any]] = []
    float_manifest = read_manifest(onnx)
    candidates: list[tuple[str, str, Any]] = [("float", "fp32", onnx)]
    for backend, method in METHODS:
        out = work / f"{backend}-{method}"
        if not (out / "manifest.json").is_file():
            print(f"· quantize {method} ({backend}) -> {out}")
            start = time.perf_counter()
            try:
                # The gate is opened here so every method's numbers are reported; the
                # verdict against its default budget is its own column.
                request = QuantizeRequest(backend=backend, calibration=calib, eval_data=held,
                                                 calibration_size=args.calibration_size, eval_size=args.eval_size,
                                                 min_agreement=0.0, min_cosine=0.0)
                quantize_artifact(onnx, out, method, request, options=QuantOptions(group_size=args.group_size))
            except Exception as exc:
                print(f"  refused: {exc}")
                candidates.append((backend, method, exc))
                continue
            print(f"  {time.perf_counter() - start:.0f} s")
        candidates.append((backend, method, out))
    for backend, method, path in candidates:
        if isinstance(path, Exception):
            rows.append({"backend": backend, "method": method, "refused": str(path)})
            continue
        m = read_manifest(path)
        fid = float_manifest.fidelity if path == onnx else m.fidelity
        row: dict[str, Any] = {"backend": backend, "method": method, "path": str(path), "size_mb": _size(path) / 1e6,
                               "judged_on": fid.get("inputs"), "samples": fid.get("samples"),
                               "reference": fid.get("reference"),
                               "top1_agreement": fid.get("top1_agreement"), "logits_cosine": fid.get("logits_cosine"),
                               "accuracy": fid.get("accuracy"), "excluded": len((m.quantization or {}).get("excluded_nodes", []))}
        if path != onnx:
            spec = METHODS[(backend, method)]
            row["passes_default_budget"] = (fid["top1_agreement"] >= spec.min_agreement
                                            and fid["logits_cosine"] >= spec.min_cosine)
        if path == onnx and args.model == "default":
            from enginekit.quant.api import evaluate_artifact

            row["accuracy"] = evaluate_artifact(onnx)["accuracy"]  # float's own, on the same held-out digits
        if m.kind == "onnx":
            row["ort_ms"] = _latency(path, "onnxruntime", args.runs)
            ov_path = work / f"{path.name}.ov"
            if not (ov_path / "manifest.json").is_file():
                try:
                    compile_artifact(path, "openvino", ov_path)
                except Exception as exc:
                    print(f"  {path.name} -> openvino: {str(exc).splitlines()[0][:120]}")
            row["ov_ms"] = _latency(ov_path, "openvino", args.runs) if ov_path.exists() else None
        else:
            row["ort_ms"] = None
            row["ov_ms"] = _latency(path, "openvino", args.runs)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], model: str) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    acc = model == "default"
    head = ["method", "built for", "size (MB)", "accuracy" if acc else "agreement", "cosine",
            "default budget", "ORT batch-1 (ms)", "OpenVINO batch-1 (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['method']} | {r['backend']} | refused: {r['refused'][:80]} |")
            continue
        quality = r["accuracy"] if acc else r["top1_agreement"]
        method = r["method"] + (f" ({r['excluded']} nodes float)" if r.get("excluded") else "")
        verdict = {True: "pass", False: "**miss**", None: "-"}[r.get("passes_default_budget")]
        lines.append(f"| {method} | {r['backend']} | {r['size_mb']:.2f} | {fmt(quality, '.4f')} | "
                     f"{fmt(r['logits_cosine'], '.5f')} | {verdict} | {fmt(r['ort_ms'], '.2f')} | "
                     f"{fmt(r['ov_ms'], '.2f')} |")
    from enginekit.quant.data import describe_data

    judged = sorted({describe_data(r["judged_on"], r["samples"]) for r in rows
                     if r.get("judged_on") and r.get("samples") and r.get("reference") == "float parent"})
    if judged:
        lines += ["", f"Agreement and cosine are against the float parent, on {'; '.join(judged)}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--calibration-size", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=None,
                        help="held-out samples (default: all 360 digits for the default model, else 64)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 weights per scale")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.eval_size is None:
        args.eval_size = 360 if args.model == "default" else 64
    args.work = args.work or Path("out") / f"quant-{args.model.replace(':', '-')}"
    rows = measure(args)
    from enginekit.hardware import fingerprint

    fp = fingerprint()
    print(f"\n{args.model} · {fp.get('cpu_model')} · {fp.get('logical_cores')} threads · "
          f"{' '.join(fp.get('flags') or [])}\n")
    print(markdown(rows, args.model))
    if args.json:
        args.json.write_text(json.dumps({"hardware": fp, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
