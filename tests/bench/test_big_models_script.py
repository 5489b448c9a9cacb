"""The full-size FLUX.1 / SD3.5 Large script (benchmarks/big_models.py), on tiny-flux so it does not rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import big_models as m

pytest.importorskip("diffusers")


@pytest.mark.slow  # two minutes; the streamed int4 export it runs is covered by tests/export/test_compress.py
def test_every_stage_on_tiny_flux(tmp_path: Path) -> None:
    """export (streamed, int4), compile and a low-memory image, each in a child with its peak RSS,
    and the step's FLOPs counted on the meta device with its floor per precision."""
    rc = m.main(["tiny-flux", "--weight-format", "int4", "--group-size", "16", "--work", str(tmp_path),
                 "--backends", "onnxruntime", "--size", "64", "--steps", "2"])
    assert rc == 0
    report = json.loads((tmp_path / "big_models.json").read_text())
    names = [s["stage"] for s in report["stages"]]
    assert names == ["export", "compile onnxruntime", "generate onnxruntime"]
    for stage in report["stages"]:
        assert stage["rc"] == 0 and stage["peak_rss_bytes"] > 0 and not stage["killed_past_limit"], stage
    result = report["stages"][-1]["result"]
    assert len(result["step_seconds"]) == 1 and result["stages"]["denoising"]["peak_bytes"] > 0
    assert (tmp_path / "onnxruntime.png").is_file()
    manifest = json.loads((tmp_path / "tiny-flux-int4" / "manifest.json").read_text())
    assert manifest["components"]["transformer"]["precision"] == "int4"
    floor = report["floor"]
    assert floor["step_gflop"] > 0 and floor["fp32"]["floor_s"] > floor["bf16"]["floor_s"] > 0
    table = m.table(report)
    assert "| generate onnxruntime |" in table and "GFLOP" in table


def test_a_stage_past_its_memory_limit_is_killed(tmp_path: Path) -> None:
    import sys

    grow = "x = []\nwhile True: x.append(bytearray(50 * 2**20))"
    stage = m.run_stage("hog", [sys.executable, "-c", grow], 400 * 2**20, tmp_path / "hog.log")
    assert stage["killed_past_limit"] and stage["rc"] != 0
