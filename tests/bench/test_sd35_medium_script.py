"""The full-size SD3.5 Medium bench script, on a reduced config so it does not rot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import sd35_medium as m
from enginekit.errors import ExportError

#: One block, narrow widths, a small position table: the script's paths in seconds.
TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, caption_projection_dim=32,
            joint_attention_dim=24, pooled_projection_dim=20, pos_embed_max_size=16, sample_size=8)


def _setup(**kw):
    return m.Setup(**{"overrides": TINY, "height": 64, "width": 48, "clip_tokens": 5, "t5_tokens": 7, "warmup": 1,
                      "repeats": 2, **kw})


def test_config_is_the_full_size_one_with_overrides() -> None:
    full = m.transformer_config({})
    assert (full["num_layers"], full["num_attention_heads"], full["joint_attention_dim"]) == (24, 24, 4096)
    assert full["dual_attention_layers"] == list(range(13))
    assert m.transformer_config({"num_layers": 2})["dual_attention_layers"] == [0, 1]
    with pytest.raises(ExportError, match="no bogus"):
        m.transformer_config({"bogus": 1})


def test_other_sd3_configs_and_half_weights_drawn_directly_when_fp32_would_not_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    large = m.transformer_config({}, "sd35-large")
    assert (large["num_layers"], large["num_attention_heads"]) == (38, 38)
    with pytest.raises(ExportError, match="config must be one of"):
        m.transformer_config({}, "flux-dev")
    setup = _setup(dtype="bf16")
    cast = m.build_transformer(setup, "bf16")  # fits: drawn in fp32, then cast
    monkeypatch.setattr(m, "_memory_bytes", lambda: 1024)  # "fp32 would not fit"
    direct = m.build_transformer(setup, "bf16")
    assert {p.dtype for p in direct.parameters()} == {torch.bfloat16} == {p.dtype for p in cast.parameters()}
    assert torch.get_default_dtype() == torch.float32  # restored
    assert sum(p.numel() for p in direct.parameters()) == sum(p.numel() for p in cast.parameters())


def test_call_inputs_are_one_cfg_step() -> None:
    feeds = m.call_inputs(m.Setup())
    assert feeds["sample"].shape == (2, 16, 64, 64)
    assert feeds["encoder_hidden_states"].shape == (2, 77 + 256, 4096)
    assert feeds["pooled_projections"].shape == (2, 2048)
    assert all(a.dtype == np.float32 for a in feeds.values())
    again = m.call_inputs(m.Setup())
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


@pytest.mark.slow  # every stage in its own interpreter: over a minute; the stages are tested one by one by default
def test_run_all_reduced_fp32(tmp_path) -> None:
    """Every stage in its own interpreter, under the watchdog, as the full-size run goes."""
    report = m.run_all(_setup(dtype="fp32"), tmp_path)
    records = {r["stage"]: r for r in report["records"]}
    assert set(records) == {"export", "pytorch", "openvino", "onnxruntime"}
    assert not any("error" in r for r in records.values()), records
    export = records["export"]
    assert export["dtype"] == "fp32" and set(export["files"]) == {"model.onnx", "model.onnx.data"}
    assert 0 < export["export_peak_gb"] <= export["peak_rss_gb"]
    for engine in ("openvino", "onnxruntime"):
        r = records[engine]
        assert len(r["calls_ms"]) == 2 and r["ms"] > 0 and r["peak_rss_gb"] > 0
        assert r["cosine"] > 0.99999 and r["max_abs"] < 1e-4, r
    saved = json.loads((tmp_path / "sd35_medium.json").read_text())
    assert saved["transformer_config"]["num_layers"] == 1 and "| onnxruntime |" in saved["table"]


def test_fp16_export_keeps_float32_io_and_follows_pytorch(tmp_path) -> None:
    """The stage functions in-process: half weights in the file, float32 in and out."""
    import onnx

    setup = _setup(dtype="fp16", warmup=0, repeats=1)
    info = m.export_onnx(setup, tmp_path)
    graph = onnx.load(str(tmp_path / "onnx" / "transformer" / "model.onnx"), load_external_data=False).graph
    floats = onnx.TensorProto.FLOAT
    assert all(v.type.tensor_type.elem_type == floats for v in (*graph.input, *graph.output))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    # fp32 constants left: only small ones (the timestep's sinusoid frequencies), no weights
    assert not [t.name for t in graph.initializer if t.data_type == floats and int(np.prod(t.dims)) > 1024]
    assert info["dtype"] == "fp16" and info["export_peak_gb"] > 0
    m.run_torch(setup, tmp_path)
    assert m.run_openvino(setup, tmp_path)["precision"] in ("bf16", "f16", "f32")
    numbers = m.compare(tmp_path, "openvino")
    assert numbers["cosine"] > 0.999 and numbers["max_abs"] < 0.05 * numbers["ref_max_abs"], numbers


def test_watchdog_kills_a_stage_over_its_rss_limit(tmp_path) -> None:
    record = m.run_stage("pytorch", _setup(), tmp_path, rss_limit=50 * 2**20, timeout_s=120)
    assert "watchdog" in record["error"] and not (tmp_path / "pytorch.json").exists()
