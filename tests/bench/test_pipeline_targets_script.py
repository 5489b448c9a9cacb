"""``benchmarks/pipeline_targets.py`` end to end on tiny-sd3 without T5: optimize's pick, the
denoiser's FLOP count for SD3's transformer, and the one-image peak-memory subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")


@pytest.mark.slow  # the whole targets script on SD3: about three minutes, so with the other full script runs
def test_targets_on_tiny_sd3_without_t5(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.pipeline_targets import main

    rc = main(["--work", str(tmp_path / "w"), "--model", "tiny-sd3", "--no-t5", "--size", "64", "--steps", "2",
               "--seeds", "0", "--backends", "onnxruntime", "--precisions", "fp32"])
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "w" / "targets.json").read_text())["result"]
    assert result["picked"] == "onnxruntime-fp32"
    assert result["report"].endswith("report.md")
    report = json.loads((tmp_path / "w" / "best" / "report.json").read_text())
    assert report["source"]["without_t5"] is True
    assert any("--no-t5" in line for line in report["rebuild"])
    assert result["floor"]["unet_gflop_per_step"] > 0  # SD3's transformer counted
    sides = {m["side"]: m for m in result["peak_memory"]}
    assert set(sides) == {"diffusers", "onnxruntime"}
    for m in sides.values():
        assert "error" not in m, m
        assert m["peak_rss_bytes"] > 50 * 2**20 and m["step_ms"] > 0 and m["image_ms"] >= m["step_ms"]
    assert "peak memory, diffusers eager fp32" in out and "peak memory, the pick (onnxruntime)" in out
    assert "transformer at 64² with CFG" in out
    # --reuse takes that pick again without optimizing (no export, no candidates)
    assert main(["--work", str(tmp_path / "w"), "--model", "tiny-sd3", "--reuse", "--no-peak-memory"]) == 0
    assert "reusing the pick" in capsys.readouterr().err
    assert main(["--work", str(tmp_path / "none"), "--reuse"]) == 2
