"""One conformance suite: every installed backend x every artifact kind x both
source libraries, compared with the PyTorch reference on the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import enginekit
from enginekit.runtimes.tasks.classifier import ImageClassifier

from ..conftest import HF_LABELS, TIMM_LABELS, backend_params, installed_backends, make_photo

KINDS = backend_params("onnx")
SOURCES = ["timm", "hf"]


def _torch_reference(source_dir: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from enginekit.export.sources import resolve_source

    src = resolve_source(str(source_dir))
    with torch.inference_mode():
        t = torch.from_numpy(x)
        if src.library == "timm":
            emb = src.model.forward_head(src.model.forward_features(t), pre_logits=True)
            logits = src.model(t)
        else:
            emb = src.model.vit(t).last_hidden_state[:, 0]
            logits = src.model(t).logits
    return logits.numpy(), emb.numpy()


@pytest.fixture(scope="module")
def references(tiny_timm_dir: Path, tiny_hf_dir: Path) -> dict[str, tuple[np.ndarray, ...]]:
    x = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)
    return {"timm": (x, *_torch_reference(tiny_timm_dir, x)), "hf": (x, *_torch_reference(tiny_hf_dir, x))}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_engine_matches_pytorch(compiled: dict, references: dict, source: str, kind: str) -> None:
    x, ref_logits, ref_emb = references[source]
    with enginekit.load(compiled[(source, kind)], device="cpu") as clf:
        assert isinstance(clf, ImageClassifier)
        out = clf.run_pixels(x)
    assert out["logits"].shape == ref_logits.shape
    assert np.abs(out["logits"] - ref_logits).max() <= 1e-4
    assert np.abs(out["embedding"] - ref_emb).max() <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", SOURCES)
def test_predict_on_photos_matches_pytorch(compiled: dict, tiny_timm_dir: Path, tiny_hf_dir: Path,
                                           tmp_path: Path, source: str, kind: str) -> None:
    """End to end from image files: our preprocessing + engine against the
    source library's own eval transform + PyTorch."""
    photos = []
    for i, size in enumerate([(64, 48), (40, 90), (32, 32)]):
        path = tmp_path / f"photo{i}.jpg"
        make_photo(size, seed=i).save(path, quality=90)
        photos.append(path)
    ref = _library_pipeline(source, tiny_timm_dir if source == "timm" else tiny_hf_dir, photos)
    labels = TIMM_LABELS if source == "timm" else [HF_LABELS[i] for i in sorted(HF_LABELS)]
    with enginekit.load(compiled[(source, kind)], device="cpu") as clf:
        preds = clf.predict([str(photos[0]), photos[1], np.asarray(_open(photos[2]))], top_k=3)
        feats = clf.embed(photos)
        logits = clf.logits(photos)
    assert np.abs(logits - ref).max() <= 1e-4
    assert [p.label for p in preds] == [labels[i] for i in ref.argmax(1)]
    assert all(len(p.top_k) == 3 and p.top_k[0][0] == p.label for p in preds)
    for p in preds:
        scores = [s for _, s in p.top_k]
        assert scores == sorted(scores, reverse=True) and p.score == scores[0]
        if len(labels) == 3:  # all classes listed: the probabilities add up to one
            assert abs(sum(scores) - 1) < 1e-5
    assert feats.shape == (3, 32) and feats.dtype == np.float32


def _open(path: Path) -> object:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _library_pipeline(source: str, folder: Path, photos: list[Path]) -> np.ndarray:
    """Logits from the source library's own loader, preprocessing and forward."""
    import torch

    if source == "timm":
        import timm
        from timm.data import create_transform, resolve_model_data_config

        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        tf = create_transform(**resolve_model_data_config(model), is_training=False)
        x = torch.stack([tf(_open(p)) for p in photos])
        with torch.inference_mode():
            return model(x).numpy()
    from transformers import AutoImageProcessor, ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(folder).eval()
    proc = AutoImageProcessor.from_pretrained(folder, backend="pil")
    x = proc(images=[_open(p) for p in photos], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        return model(x).logits.numpy()


def test_onnx_artifact_records_what_the_task_layer_needs(exported: dict) -> None:
    from enginekit.manifest import read_manifest

    m = read_manifest(exported["timm"])
    assert m.kind == "onnx" and m.task == "image-classification" and m.family == "vit"
    assert m.labels == tuple(TIMM_LABELS)
    comp = m.component()
    assert [s.name for s in comp.inputs] == ["pixel_values"]
    assert comp.inputs[0].shape[0] == "batch"
    assert [s.name for s in comp.outputs] == ["logits", "embedding"]
    assert m.fidelity["logits_max_abs"] <= m.fidelity["budget_max_abs"]
    assert m.provenance["weights_sha256"] and m.provenance["tools"]["opset"] == 18
    hf = read_manifest(exported["hf"])
    assert hf.labels == ("negative", "neutral", "positive")
    assert hf.preprocessing["source"] == "transformers"


def test_compiled_manifest_links_to_parent(compiled: dict, exported: dict) -> None:
    from enginekit.manifest import read_manifest

    parent = read_manifest(exported["timm"])
    for backend in installed_backends():
        m = read_manifest(compiled[("timm", backend)])
        assert m.kind == backend
        assert m.provenance["parent"]["manifest_sha256"] == parent.digest()
        assert m.target["backend"] == backend
        assert m.preprocessing == parent.preprocessing and m.labels == parent.labels
