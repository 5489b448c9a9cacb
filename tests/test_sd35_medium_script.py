"""The full-size SD3.5 Medium bench script, on a reduced config so it does not rot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from enginekit.bench import sd35_medium as m
from enginekit.errors import ExportError

#: One block, narrow widths, a small position table: the script's paths in seconds.
TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, caption_projection_dim=32,
            joint_attention_dim=24, pooled_projection_dim=20, pos_embed_max_size=16, sample_size=8)


def _setup(**kw):
    return m.Setup(overrides=TINY, height=64, width=48, clip_tokens=5, t5_tokens=7, warmup=1, repeats=2, **kw)


def test_config_is_the_full_size_one_with_overrides() -> None:
    full = m.transformer_config({})
    assert (full["num_layers"], full["num_attention_heads"], full["joint_attention_dim"]) == (24, 24, 4096)
    assert full["dual_attention_layers"] == list(range(13))
    assert m.transformer_config({"num_layers": 2})["dual_attention_layers"] == [0, 1]
    with pytest.raises(ExportError, match="no bogus"):
        m.transformer_config({"bogus": 1})


def test_call_inputs_are_one_cfg_step() -> None:
    feeds = m.call_inputs(m.Setup())
    assert feeds["sample"].shape == (2, 16, 64, 64)
    assert feeds["encoder_hidden_states"].shape == (2, 77 + 256, 4096)
    assert feeds["pooled_projections"].shape == (2, 2048)
    assert all(a.dtype == np.float32 for a in feeds.values())
    again = m.call_inputs(m.Setup())
    assert all(np.array_equal(feeds[k], again[k]) for k in feeds)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_run_all_reduced(tmp_path, dtype: str) -> None:
    report = m.run_all(_setup(dtype=dtype), tmp_path, skip=("onnxruntime",) if dtype == "fp16" else ())
    records = {r["stage"]: r for r in report["records"]}
    want = {"export", "pytorch", "openvino"} | ({"onnxruntime"} if dtype == "fp32" else set())
    assert set(records) == want and not any("error" in r for r in records.values())
    export = records["export"]
    assert export["dtype"] == dtype and set(export["files"]) == {"model.onnx", "model.onnx.data"}
    for engine in want - {"export", "pytorch"}:
        r = records[engine]
        assert len(r["calls_ms"]) == 2 and r["ms"] > 0 and r["peak_rss_gb"] > 0
        assert r["cosine"] > (0.99999 if dtype == "fp32" else 0.999), r
        assert r["max_abs"] < (1e-4 if dtype == "fp32" else 0.05 * r["ref_max_abs"]), r
    saved = json.loads((tmp_path / "sd35_medium.json").read_text())
    assert saved["transformer_config"]["num_layers"] == 1 and "| openvino |" in saved["table"]


def test_watchdog_kills_a_stage_over_its_rss_limit(tmp_path) -> None:
    record = m.run_stage("pytorch", _setup(), tmp_path, rss_limit=50 * 2**20, timeout_s=120)
    assert "watchdog" in record["error"] and not (tmp_path / "pytorch.json").exists()
