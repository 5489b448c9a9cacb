"""Explanations: the engine's attention rollout (ONNX, ONNX Runtime, OpenVINO) against a rollout
written here in PyTorch over the source model's own attention; occlusion maps; the plain engine
left as it was; overlays on the image's own pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import enginekit
from enginekit.errors import BackendError, InputError, ManifestError
from enginekit.runtimes.preprocess import Preprocessing, preprocess
from enginekit.runtimes.tasks.explain import AttentionLayout, ExplainOptions, occlusion_grid

from ..conftest import installed_backends, make_photo

KINDS = ["onnx", *installed_backends()]


def torch_rollout(source_dir: Path, library: str, pixels: np.ndarray) -> np.ndarray:
    """Abnar & Zuidema's rollout in PyTorch over the source model's attention probabilities (timm's
    fused attention off, transformers' eager attention): the class token's row over the patches."""
    import torch

    x = torch.from_numpy(pixels)
    with torch.inference_mode():
        if library == "timm":
            from safetensors.torch import load_file

            import timm

            from ..conftest import TIMM_LABELS, TINY_TIMM_ARGS

            model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(TIMM_LABELS),
                                      **TINY_TIMM_ARGS)
            model.load_state_dict(load_file(source_dir / "model.safetensors"))
            model.eval()
            probs: list[torch.Tensor] = []
            for block in model.blocks:
                block.attn.fused_attn = False
                block.attn.attn_drop.register_forward_hook(lambda m, args, out: probs.append(out))
            model(x)
        else:
            from transformers import ViTForImageClassification

            model = ViTForImageClassification.from_pretrained(source_dir, attn_implementation="eager").eval()
            probs = list(model(x, output_attentions=True).attentions)
        joint = torch.eye(probs[0].shape[-1], dtype=torch.float64).expand(len(x), -1, -1)
        for layer in probs:
            a = layer.double().mean(dim=1) + torch.eye(layer.shape[-1], dtype=torch.float64)
            joint = (a / a.sum(dim=-1, keepdim=True)) @ joint
    side = int(round((joint.shape[-1] - 1) ** 0.5))
    return joint[:, 0, 1:].reshape(len(x), side, side).float().numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_engine_rollout_is_pytorchs(kind: str, compiled: dict, tiny_timm_dir: Path, tiny_hf_dir: Path) -> None:
    images = [make_photo((48, 40), 1), make_photo((40, 56), 2), make_photo((32, 32), 3)]
    for library, source in (("timm", tiny_timm_dir), ("hf", tiny_hf_dir)):
        clf = enginekit.load(compiled[(library, kind)], device="cpu")
        found = clf.explain(images)
        want = torch_rollout(source, "timm" if library == "timm" else "hf", preprocess(images, clf.preprocessing))
        got = np.stack([e.grid for e in found])
        assert got.shape == want.shape == (3, 4, 4)
        np.testing.assert_allclose(got, want, atol=1e-5)
        # The verdict is the plain engine's, and the plain engine is still the only graph it runs.
        plain = clf.predict(images)
        assert [e.prediction.label for e in found] == [p.label for p in plain]
        np.testing.assert_allclose([e.prediction.score for e in found], [p.score for p in plain], atol=1e-5)
        assert {o.name for o in clf.runner.outputs} == {"logits", "embedding"}
        assert clf._components.loaded == ("model", "model#attention")
        clf.close()


def test_export_records_layout_and_rollout_fidelity(exported: dict) -> None:
    for path in exported.values():
        manifest = enginekit.load(path, device="cpu").manifest
        assert manifest.extra["attention"] == {"prefix_tokens": 1, "grid": [4, 4], "query": "cls"}
        assert manifest.fidelity["rollout_max_abs"] <= manifest.fidelity["rollout_budget"]
        assert manifest.fidelity["attention_max_abs"] < 1e-5


def test_layout_of_an_artifact_without_the_record() -> None:
    assert AttentionLayout.resolve(None, 17, (32, 32)) == AttentionLayout(1, (4, 4), "cls")
    assert AttentionLayout.resolve(None, 577, (384, 384)) == AttentionLayout(1, (24, 24), "cls")
    assert AttentionLayout.resolve(None, 16, (32, 32)) == AttentionLayout(0, (4, 4), "mean")
    assert AttentionLayout.resolve(None, 18, (32, 32)) == AttentionLayout(2, (4, 4), "cls")  # class + distillation
    assert AttentionLayout.resolve(None, 25, (32, 48)) == AttentionLayout(1, (4, 6), "cls")
    with pytest.raises(ManifestError, match="export the model again"):
        AttentionLayout.resolve({"prefix_tokens": 1, "grid": [5, 5]}, 17, (32, 32))


def test_occlusion_finds_the_region_the_score_reads() -> None:
    """A 'model' whose score is the mean of one 8x8 region: covering that region is what drops it."""
    pixels = np.ones((3, 32, 32), dtype=np.float32)

    def probabilities(batch: np.ndarray) -> np.ndarray:
        score = batch[:, :, 8:16, 16:24].mean(axis=(1, 2, 3))
        return np.stack([score, 1 - score], axis=1)

    grid = occlusion_grid(pixels, 0, probabilities, ExplainOptions(window=8))
    want = np.zeros((4, 4), dtype=np.float32)
    want[1, 2] = 1.0
    np.testing.assert_allclose(grid, want)
    half = occlusion_grid(pixels, 0, probabilities, ExplainOptions(window=8, stride=4, batch_size=5))
    assert half.shape == (7, 7) and half[2, 4] == 1.0 and half[2, 3] == half[1, 4] == 0.5


def test_occlusion_through_the_engine_and_the_overlay(compiled: dict) -> None:
    from PIL import Image

    clf = enginekit.load(compiled[("timm", "onnx")], device="cpu")
    image = make_photo((64, 48), 4)
    found = clf.explain([image], "occlusion", options=ExplainOptions(window=8, stride=8))[0]
    assert found.method == "occlusion" and found.grid.shape == (4, 4)
    assert found.prediction.label == clf.predict([image])[0].label
    assert clf._components.loaded == ("model",)  # occlusion runs the plain engine only
    # timm's 0.875 crop: the model saw the middle of the image; the rest is dimmed, not coloured.
    cfg = Preprocessing.from_dict(clf.manifest.preprocessing)
    left, top, right, bottom = found.box
    assert 0 < left < right < 64 and 0 < top < bottom < 48 and cfg.center_crop
    over = np.asarray(found.overlay(image), dtype=np.float32)
    assert over.shape == (48, 64, 3)
    np.testing.assert_allclose(over[0, 0], np.round(np.asarray(image, dtype=np.float32)[0, 0] * 0.45), atol=1)
    png = found.to_dict(image)["overlay_png"]
    import base64
    import io

    assert Image.open(io.BytesIO(base64.b64decode(png))).size == image.size


def test_explain_refuses_what_it_cannot_do(exported: dict, tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from enginekit.runtimes.attention_taps import ATTENTION_TAP

    with pytest.raises(InputError, match="method must be one of"):
        enginekit.load(exported["timm"], device="cpu").explain([make_photo((32, 32), 1)], "gradcam")
    with pytest.raises(InputError, match="head_fusion"):
        ExplainOptions(head_fusion="sum")
    with pytest.raises(InputError, match="discard_ratio"):
        ExplainOptions(discard_ratio=1.5)
    # A graph whose attention is one fused operator (ONNX Runtime's Attention) has no probabilities.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])
    node = helper.make_node("Attention", ["x", "w"], ["y"], domain="com.microsoft", num_heads=2)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 24], [0.0] * 192)
    path = tmp_path / "fused.onnx"
    onnx.save(helper.make_model(helper.make_graph([node], "g", [x], [y], [w])), str(path))
    with pytest.raises(BackendError, match="fused into ONNX Runtime's Attention.*occlusion"):
        ATTENTION_TAP.apply_onnx(path)


def test_rollout_options_change_the_map(exported: dict) -> None:
    clf = enginekit.load(exported["timm"], device="cpu")
    image = make_photo((40, 40), 6)
    plain = clf.explain(image)[0].grid
    for options in (ExplainOptions(head_fusion="max"), ExplainOptions(discard_ratio=0.5)):
        other = clf.explain(image, options=options)[0].grid
        assert other.shape == plain.shape and not np.allclose(other, plain)


def test_token_merged_engine_explains_by_occlusion(tiny_timm_dir: Path, tmp_path: Path) -> None:
    from enginekit.export.vit import ExportOptions, export_classifier

    manifest = export_classifier(str(tiny_timm_dir), tmp_path / "merged", ExportOptions(token_merge=2))
    assert "attention" not in manifest.extra  # no one grid: its blocks attend over fewer and fewer tokens
    clf = enginekit.load(tmp_path / "merged", device="cpu")
    image = make_photo((32, 32), 7)
    with pytest.raises(BackendError, match="token-merge.*occlusion"):
        clf.explain(image)
    assert clf.explain(image, "occlusion")[0].grid.shape == (8, 8)
