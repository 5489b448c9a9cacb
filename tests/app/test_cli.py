"""The CLI through click's CliRunner: each command, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from enginekit.app.cli import cli

from ..conftest import TIMM_LABELS, installed_backends, make_photo


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def _ok(result) -> None:  # noqa: ANN001
    assert result.exit_code == 0, result.output + repr(result.exception)


def _one_line_error(result, needle: str) -> None:  # noqa: ANN001
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("Error: ") and needle in lines[-1], result.output


def test_export_compile_predict_inspect(runner: CliRunner, tiny_timm_dir: Path, tmp_path: Path) -> None:
    onnx_dir = tmp_path / "onnx"
    result = runner.invoke(cli, ["export", str(tiny_timm_dir), "-o", str(onnx_dir)])
    _ok(result)
    assert (onnx_dir / "manifest.json").is_file()

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    make_photo((50, 40), 0).save(photos / "a.png")
    make_photo((30, 60), 1).save(photos / "sub" / "b.jpg")
    single = tmp_path / "c.jpg"
    make_photo((32, 32), 2).save(single)

    for backend in installed_backends():
        out = tmp_path / backend
        _ok(runner.invoke(cli, ["compile", str(onnx_dir), "--backend", backend, "-o", str(out)]))
        result = runner.invoke(cli, ["predict", str(out), str(single), str(photos), "--top-k", "2", "--json"])
        _ok(result)
        preds = json.loads(result.output)
        assert [Path(p["image"]).name for p in preds] == ["c.jpg", "a.png", "b.jpg"]
        assert all(p["label"] in TIMM_LABELS and len(p["top_k"]) == 2 for p in preds)
        table = runner.invoke(cli, ["predict", str(out), str(single)])
        _ok(table)
        assert "c.jpg" in table.output

    result = runner.invoke(cli, ["inspect", str(onnx_dir)])
    _ok(result)
    assert "image-classification" in result.output and "every file matches its sha256" in result.output
    assert "[batch," in result.output  # shapes shown literally, not eaten as rich markup
    result = runner.invoke(cli, ["inspect", str(onnx_dir), "--json"])
    _ok(result)
    assert json.loads(result.output)["manifest"]["image-classification"]["labels"] == TIMM_LABELS


def test_export_random_weights_timm_name(runner: CliRunner, tmp_path: Path) -> None:
    # timm's own tiny test twin of ViT: the `timm:NAME --random-weights` path, fast.
    result = runner.invoke(cli, ["export", "timm:test_vit", "--random-weights", "-o", str(tmp_path / "o"), "--json"])
    _ok(result)
    manifest = json.loads(result.stdout)
    assert manifest["provenance"]["weights"] == "random" and manifest["provenance"]["seed"] == 0


def test_doctor(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["doctor", "--json"])
    _ok(result)
    report = json.loads(result.output)
    names = {b["name"]: b for b in report["backends"]}
    assert names["onnxruntime"]["installed"] and "cpu" in names["onnxruntime"]["devices"]
    assert report["hardware"]["logical_cores"] >= 1
    _ok(runner.invoke(cli, ["doctor"]))


def test_help_explains(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    _ok(result)
    for cmd in ("export", "compile", "predict", "inspect", "doctor", "demo"):
        assert cmd in result.output
    result = runner.invoke(cli, ["export", "--help"])
    assert "timm:NAME" in result.output and "--random-weights" in result.output


def test_bad_input_gives_one_line_errors(runner: CliRunner, exported: dict, tmp_path: Path) -> None:
    art = exported["timm"]
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    _one_line_error(runner.invoke(cli, ["predict", str(art), str(text)]), "notes.jpg")
    _one_line_error(runner.invoke(cli, ["predict", str(art), str(tmp_path / "missing.png")]), "missing.png")
    _one_line_error(runner.invoke(cli, ["predict", str(tmp_path), str(text)]), "no manifest.json")
    _one_line_error(runner.invoke(cli, ["compile", str(art), "--backend", "nope", "-o", str(tmp_path / "x")]),
                    "unknown backend 'nope'")
    _one_line_error(runner.invoke(cli, ["export", "not-a-model", "-o", str(tmp_path / "y")]), "not a model source")
    _one_line_error(runner.invoke(cli, ["export", "timm:no_such_net", "--random-weights", "-o", str(tmp_path / "z")]),
                    "timm has no model named")
    tampered = tmp_path / "tampered"
    shutil.copytree(art, tampered)
    (tampered / "model.onnx").write_bytes((tampered / "model.onnx").read_bytes() + b"x")
    _one_line_error(runner.invoke(cli, ["predict", str(tampered), str(text)]), "truncated or replaced")
    _one_line_error(runner.invoke(cli, ["compile", str(art), "--backend", "onnxruntime", "-o", str(art)]),
                    "already exists")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bench_and_report(runner: CliRunner, exported: dict, tmp_path: Path) -> None:
    store = tmp_path / "results" / "r.jsonl"
    result = runner.invoke(cli, ["bench", str(exported["timm"]), str(exported["hf"]), "--batch", "1,2",
                                 "--runs", "3", "--warmup", "1", "--store", str(store),
                                 "--json", str(tmp_path / "run.json")])
    _ok(result)
    records = json.loads((tmp_path / "run.json").read_text())
    assert len(records) == 4 and {r["batch"] for r in records} == {1, 2}
    assert len(store.read_text().splitlines()) == 4
    result = runner.invoke(cli, ["bench", "report", str(store.parent), "-o", str(tmp_path / "report")])
    _ok(result)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "timm" in report and any((tmp_path / "report").glob("*.png"))
    _one_line_error(runner.invoke(cli, ["bench", str(exported["timm"]), "--batch", "x"]), "batch sizes")
    _one_line_error(runner.invoke(cli, ["bench", "report", str(tmp_path / "none"), "-o", str(tmp_path / "r2")]),
                    "no such results")
