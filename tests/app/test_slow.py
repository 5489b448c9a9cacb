"""Full-size vit_small_patch16_384 (seeded weights): export, compile, compare. Minutes on
2 cores, so marked slow: run with `bash scripts/test.sh -m slow`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import enginekit

from ..conftest import installed_backends

pytestmark = pytest.mark.slow


def test_vit_small_patch16_384_every_backend(tmp_path: Path) -> None:
    import torch

    from enginekit.api import compile_artifact
    from enginekit.export.sources import resolve_source
    from enginekit.export.vit import export_classifier

    src = resolve_source("timm:vit_small_patch16_384", random_weights=True, seed=0)
    manifest = export_classifier(src, tmp_path / "onnx")
    assert manifest.preprocessing["size"] == [384, 384]
    assert manifest.preprocessing["interpolation"] == "bicubic"
    x = np.random.default_rng(0).normal(size=(2, 3, 384, 384)).astype(np.float32)
    with torch.inference_mode():
        ref = src.model(torch.from_numpy(x)).numpy()
    paths = {"onnx": tmp_path / "onnx"}
    for backend in installed_backends():
        paths[backend] = tmp_path / backend
        compile_artifact(tmp_path / "onnx", backend, paths[backend])
    for kind, path in paths.items():
        with enginekit.load(path, device="cpu") as clf:
            logits = clf.run_pixels(x)["logits"]
        assert np.abs(logits - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max())), kind
        assert (logits.argmax(1) == ref.argmax(1)).all(), kind
