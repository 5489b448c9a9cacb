"""Token merging (ToMe) for ViT classifiers: the rule, the export, and optimize's use of it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from enginekit.app.cli import cli
from enginekit.manifest import read_manifest

from ..conftest import installed_backends, make_photo


def _tome_reference(x, size, metric, r):  # noqa: ANN001, ANN202 - torch tensors
    """ToMe's own formulation (facebookresearch/ToMe, tome/merge.py: bipartite_soft_matching with
    class_token=True, then merge_wavg), written as it is there: in-place -inf, scatter_reduce."""
    import torch

    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :].sort(dim=1)[0]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    merged_x, merged_size = merge(x * size), merge(size)
    return merged_x / merged_size, merged_size


def test_the_merge_is_tomes_rule() -> None:
    import torch

    from enginekit.export.token_merge import _merge_weighted, merged_tokens

    gen = torch.Generator().manual_seed(0)
    x, metric = torch.randn(3, 17, 8, generator=gen), torch.randn(3, 17, 6, generator=gen)
    size = torch.randint(1, 4, (3, 17, 1), generator=gen).float()
    for r in (1, 4, 8):
        got_x, got_size = _merge_weighted(x, size, metric, r)
        want_x, want_size = _tome_reference(x, size, metric, r)
        assert got_x.shape == (3, 17 - r, 8)
        assert torch.equal(got_size, want_size) and torch.allclose(got_x, want_x, atol=1e-6)
        assert torch.equal(got_x[:, 0], x[:, 0])  # the class token is never merged, and stays first
    # the tokens each block sees: r fewer per block, none merged after the last, never past half
    assert merged_tokens(577, 16, 12) == [577 - 16 * i for i in range(12)]
    assert merged_tokens(17, 8, 3) == [17, 9, 5]


@pytest.mark.parametrize("source", ["timm", "transformers"])
def test_without_merging_the_wrapper_is_the_model(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merged module re-runs the model's own layers: with no pair merged it is the model, exactly."""
    import timm
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from enginekit.export import token_merge
    from ..conftest import TINY_TIMM_ARGS

    torch.manual_seed(0)
    if source == "timm":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, **TINY_TIMM_ARGS).eval()
    else:
        model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, image_size=32, patch_size=8)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        want = model(x) if source == "timm" else model(x).logits
        monkeypatch.setattr(token_merge, "_pairs", lambda r, tokens, last: 0)
        assert torch.allclose(token_merge.token_merged(model, source, 4)(x), want, atol=1e-6)
        monkeypatch.undo()
        assert not torch.allclose(token_merge.token_merged(model, source, 4)(x), want, atol=1e-6)


@pytest.mark.parametrize("source", ["timm", "transformers"])
def test_export_merges_and_records_it(source: str, tiny_timm_dir: Path, tiny_hf_dir: Path, tmp_path: Path) -> None:
    import enginekit

    model = tiny_timm_dir if source == "timm" else tiny_hf_dir
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["export", str(model), "-o", str(out), "--token-merge", "3"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    merge = manifest.provenance["token_merge"]
    tokens = 1 + (32 // 8) ** 2
    assert merge["r"] == 3 and merge["tokens_per_block"] == [tokens, tokens - 3]
    # the ONNX matches the merged PyTorch model (the export's own parity gate) ...
    assert manifest.fidelity["logits_max_abs"] <= manifest.fidelity["budget_max_abs"]
    # ... which is not the model: how far merging moved it is recorded, not hidden
    assert manifest.fidelity["unmerged_model"]["logits_max_abs"] > 1e-5
    photos = [make_photo((40, 30), seed) for seed in range(3)]
    with enginekit.load(out) as clf:
        scores = [p.score for p in clf.predict(photos)]
    if source == "timm" and "openvino" in installed_backends():
        from enginekit.api import compile_artifact
        from enginekit.runtimes.base import CompileOptions

        compile_artifact(out, "openvino", tmp_path / "ov", CompileOptions(device="cpu", extra={"static_batch": 1}))
        with enginekit.load(tmp_path / "ov") as clf:
            assert np.allclose([p.score for p in clf.predict(photos)], scores, atol=1e-4)


def test_token_merge_is_refused_where_it_does_not_apply(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["export", "tiny-sd15", "-o", str(tmp_path / "p"), "--token-merge", "2"])
    assert result.exit_code != 0 and "--token-merge applies to ViT classifiers" in result.output
    assert not (tmp_path / "p").exists()
    result = CliRunner().invoke(cli, ["optimize", "tiny-sd15", "-o", str(tmp_path / "q"), "--token-merge", "2"])
    assert result.exit_code != 0 and "--token-merge is for classifiers" in result.output


def test_optimize_tries_merged_candidates_and_rebuilds_them(tiny_timm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "best"
    args = ["optimize", str(tiny_timm_dir), "-o", str(out), "--backends", "onnxruntime", "--precisions", "fp32",
            "--data", "photos", "--eval-size", "16", "--calibration-size", "16", "--runs", "3", "--warmup", "1",
            "--budget-agreement", "0", "--budget-cosine", "0", "--token-merge", "3", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    names = {c["candidate"]["name"]: c for c in report["candidates"]}
    merged = names["onnxruntime-fp32+tome:3"]
    # judged against the unmerged PyTorch model, on both held-out sets, and timed
    assert merged["candidate"]["token_merge"] == 3 and len(merged["fidelity"]["sets"]) == 2
    assert merged["fidelity"]["logits_max_abs"] > 0 and merged["record"] is not None
    from enginekit.app.rebuild import rebuild_commands

    lines = rebuild_commands(report, merged["candidate"])
    assert lines[0].startswith("enginekit export") and lines[0].endswith("--token-merge 3")
    if report["picked"] == merged["candidate"]["name"]:
        assert read_manifest(out).provenance["token_merge"]["r"] == 3


def test_masked_attention_scores_stay_float_in_the_qdq_graph(tiny_timm_dir: Path, tmp_path: Path) -> None:
    """A merged ViT's attention gets log(size) as a run-time mask. Its scores stay float in the
    Q/DQ graph: OpenVINO 2026.4's CPU plugin miscomputes int8 scores plus a run-time mask at static
    shapes (this model: 0.11 off ONNX Runtime with them quantized), so the engine must match ORT."""
    import onnx
    import onnxruntime as ort

    from enginekit.quant.api import quantize_artifact
    from enginekit.quant.ort_graph import masked_attention_scores

    merged, plain = tmp_path / "merged", tmp_path / "plain"
    for out, extra in ((merged, ["--token-merge", "3"]), (plain, [])):
        result = CliRunner().invoke(cli, ["export", str(tiny_timm_dir), "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
    assert masked_attention_scores(onnx.load(str(plain / "model.onnx"))) == []  # no mask, nothing kept
    masked = masked_attention_scores(onnx.load(str(merged / "model.onnx")))
    assert len(masked) == 2  # one per block
    quantize_artifact(merged, tmp_path / "q", "int8-qdq", backend="tensorrt", calibration="photos",
                      calibration_size=16, check_fidelity=False)
    details = read_manifest(tmp_path / "q").quantization
    assert details["float_masked_attention_scores"] == masked
    graph = onnx.load(str(tmp_path / "q" / "model.onnx")).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    scores = [n for n in graph.node if n.name in masked]
    assert scores and all(made_by.get(i) != "DequantizeLinear" for n in scores for i in n.input)
    others = [n for n in graph.node if n.op_type == "MatMul" and n.name not in masked]
    assert all(made_by.get(n.input[0]) == "DequantizeLinear" for n in others)  # the rest stays int8
    if "openvino" not in installed_backends():
        return
    import openvino as ov

    x = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "q" / "model.onnx"), providers=["CPUExecutionProvider"])
    model = ov.Core().read_model(str(tmp_path / "q" / "model.onnx"))
    model.reshape({"pixel_values": [1, 3, 32, 32]})
    engine = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for i in range(len(x)):
        want = session.run(None, {"pixel_values": x[i:i + 1]})[0]
        assert np.abs(engine({"pixel_values": x[i:i + 1]})[0] - want).max() < 0.02
