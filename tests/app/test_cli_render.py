"""What the CLI prints goes through rich with user text escaped: no markup leaks
(a literal ``[dim]``) and none is eaten (``[onnxruntime]`` in an install hint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from enginekit.app import render
from enginekit.app.cli import cli
from enginekit.errors import InputError


def _openvino_only_report() -> dict[str, Any]:
    return {"hardware": {"cpu_model": "Test CPU [v2]", "flags": ["avx2"], "versions": {"numpy": "2.0"}},
            "backends": [{"name": "onnxruntime", "installed": False, "version": None, "extra": "onnxruntime"},
                         {"name": "openvino", "installed": True, "version": "2025.1", "extra": "openvino",
                          "devices": ["CPU"]}]}


def test_doctor_keeps_the_extra_in_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import enginekit.app.inspect as inspect

    monkeypatch.setattr(inspect, "doctor_report", _openvino_only_report)
    res = CliRunner().invoke(cli, ["doctor"])
    assert res.exit_code == 0, res.output
    assert "pip install 'enginekit[onnxruntime]'" in res.output
    assert "Test CPU [v2]" in res.output


def test_progress_lines_show_no_markup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import enginekit.stages as stages

    def fake_optimize(model: str, out: Path, options: Any, *, on_step: Any) -> dict[str, Any]:
        on_step("export -> [work]/onnx")
        raise InputError("stopped here")

    monkeypatch.setattr(stages, "optimize", fake_optimize)
    res = CliRunner().invoke(cli, ["optimize", "tiny-sd15", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "· export -> [work]/onnx" in res.output
    assert "[dim]" not in res.output and "[/]" not in res.output


def test_user_text_in_tables_is_escaped() -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render.render_demo([{"engine": "onnx [fp32]", "device": "cpu", "latency_ms_batch1": 1.0,
                                       "accuracy": 1.0, "images": 3}]))
    console.print(render.fate_lines({"budget": {}, "candidates": [
        {"candidate": {"name": "ov [int8]"}, "status": "failed", "reason": "bad [red]x[/red]"}]})[0])
    text = console.export_text()
    assert "onnx [fp32]" in text and "ov [int8]: failed: bad [red]x[/red]" in text
