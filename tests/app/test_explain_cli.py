"""``enginekit predict --explain OUTDIR``: one overlay per image, named after it, and the same
verdicts as without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

import enginekit
from enginekit.app.cli import cli

from ..conftest import make_photo


def test_predict_explain_writes_overlays(exported: dict, tmp_path: Path) -> None:
    from PIL import Image

    a, b = tmp_path / "a" / "cat.png", tmp_path / "b" / "cat.png"
    for i, path in enumerate((a, b)):
        path.parent.mkdir()
        make_photo((64, 48), i).save(path)
    out = tmp_path / "maps"
    runner = CliRunner()
    result = runner.invoke(cli, ["predict", str(exported["timm"]), str(a), str(b), "--explain", str(out), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    plain = json.loads(runner.invoke(cli, ["predict", str(exported["timm"]), str(a), str(b), "--json"]).stdout)
    assert [r["label"] for r in rows] == [r["label"] for r in plain]
    # Two images with one name: the second overlay gets a number.
    assert [Path(r["explanation"]).name for r in rows] == ["cat_explain.png", "cat_explain-2.png"]
    want = enginekit.load(exported["timm"], device="cpu").explain([str(a)])[0].overlay(Image.open(a))
    assert np.array_equal(np.asarray(Image.open(out / "cat_explain.png")), np.asarray(want))

    result = runner.invoke(cli, ["predict", str(exported["hf"]), str(a), "--explain", str(out),
                                 "--explain-method", "occlusion"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 occlusion overlay(s)" in result.stderr
    assert Image.open(out / "cat_explain.png").size == (64, 48)
