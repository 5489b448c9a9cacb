"""The main job on the built-in default model.

Export the digits ViT, compile it for every installed backend, classify the
held-out digits with each engine and with PyTorch itself, and report latency
and accuracy side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["run_demo", "evaluate_folder", "time_batch1"]


def evaluate_folder(clf: Any, folder: Path) -> tuple[float, int]:
    """Accuracy of ``clf`` on a folder laid out one sub-folder per class label."""
    from enginekit.runtimes.images import expand_image_paths

    paths = expand_image_paths([folder])
    truth = [p.parent.name for p in paths]
    preds = clf.predict(paths, top_k=1)
    correct = sum(pred.label == t for pred, t in zip(preds, truth))
    return correct / len(paths), len(paths)


def time_batch1(fn: Callable[[], Any], warmup: int = 5, runs: int = 50) -> float:
    """Median wall time of ``fn`` in milliseconds after ``warmup`` calls (the bench harness's timer)."""
    from enginekit.bench.harness import BenchConfig, latency_stats, time_callable

    return latency_stats(time_callable(fn, BenchConfig(warmup=warmup, runs=runs)))["p50"]


def run_demo(out: str | Path, on_step: Callable[[str], None] = lambda msg: None) -> list[dict[str, Any]]:
    """Run export → compile (each installed backend) → predict; return one row per engine."""
    import enginekit
    from enginekit.api import compile_artifact
    from enginekit.export.sources import resolve_source
    from enginekit.export.vit import export_classifier
    from enginekit.models.digits import write_digit_images
    from enginekit.registry import backend_class

    out = Path(out)
    digits = out / "digits-test"
    if not digits.exists():
        on_step(f"writing the held-out digits to {digits}")
        write_digit_images(digits, split="test")
    onnx_dir = out / "onnx"
    on_step(f"export default -> {onnx_dir}")
    source = resolve_source("default")
    export_classifier(source, onnx_dir, overwrite=True)
    engines = [("onnx (onnxruntime)", onnx_dir)]
    for backend, name in (("onnxruntime", "ort"), ("openvino", "openvino")):
        if not backend_class(backend).is_available():
            on_step(f"{backend} is not installed: skipped")
            continue
        on_step(f"compile --backend {backend} -> {out / name}")
        compile_artifact(onnx_dir, backend, out / name, overwrite=True)
        engines.append((backend, out / name))

    rows = [_torch_row(source, digits)]
    for label, path in engines:
        on_step(f"predict with {path}")
        with enginekit.load(path, device="cpu", batch_size=64) as clf:
            accuracy, n = evaluate_folder(clf, digits)
            x = np.zeros((1, *clf.runner.inputs[0].shape[1:]), dtype=np.float32)
            latency = time_batch1(lambda: clf.run_pixels(x))
            rows.append({"engine": label, "artifact": str(path), "device": clf.device,
                         "latency_ms_batch1": latency, "accuracy": accuracy, "images": n})
    return rows


def _torch_row(source: Any, digits: Path) -> dict[str, Any]:
    import torch

    from enginekit.runtimes.images import expand_image_paths, load_images
    from enginekit.runtimes.preprocess import preprocess

    paths = expand_image_paths([digits])
    x = torch.from_numpy(preprocess(load_images(paths), source.preprocessing))
    with torch.inference_mode():
        pred = source.model(x).argmax(-1).numpy()
        labels = source.labels or tuple(str(i) for i in range(int(pred.max()) + 1))
        accuracy = float(np.mean([labels[i] == p.parent.name for i, p in zip(pred, paths)]))
        one = x[:1]
        latency = time_batch1(lambda: source.model(one))
    return {"engine": "pytorch eager (reference)", "artifact": "-", "device": "cpu",
            "latency_ms_batch1": latency, "accuracy": accuracy, "images": len(paths)}
