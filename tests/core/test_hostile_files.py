"""What a careless or hostile command line must not do to the user's files: overwrite
only enginekit's own outputs, refuse numbers that could never give a working engine
before anything is written, say "no space left" in one line on a full disk, and let
``doctor`` find and clean the temporaries a killed stage left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from enginekit.app.cli import cli
from enginekit.artifact import atomic_artifact, atomic_folder
from enginekit.errors import ArtifactError

from ..conftest import backend_params, installed_backends

ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(result, needle: str) -> None:  # noqa: ANN001
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("Error: ") and needle in lines[-1], result.output


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder): a snapshot to compare."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture()
def art(exported: dict, tmp_path: Path) -> Path:
    """A private copy of the tiny ONNX classifier (tests below try to destroy it)."""
    out = tmp_path / "art"
    shutil.copytree(exported["timm"], out)
    return out


# ---------------------------------------------------------------------------- --overwrite


def test_overwrite_refuses_a_folder_that_is_not_an_artifact(art: Path, tmp_path: Path) -> None:
    mine = tmp_path / "notart"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years of work")
    result = CliRunner().invoke(cli, ["compile", str(art), "-b", "onnxruntime", "-o", str(mine), "--overwrite"])
    _one_line_error(result, "replaces only an enginekit artifact folder")
    assert (mine / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "notart"]


def test_overwrite_refuses_a_folder_that_holds_the_input(art: Path, tmp_path: Path) -> None:
    par = tmp_path / "par"
    shutil.copytree(art, par)  # itself an artifact: only the input rule can refuse it
    src = par / "child" / "src"
    shutil.copytree(art, src)
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli, ["compile", str(src), "-b", "onnxruntime", "-o", str(par), "--overwrite"])
    _one_line_error(result, "is the input")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("out", ["", "..", ".", "x/.."])
def test_empty_dot_and_dotdot_outputs_are_refused(art: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  out: str) -> None:
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli, ["compile", str(art), "-b", "onnxruntime", "-o", out, "--overwrite"])
    _one_line_error(result, "folder")
    assert _tree(tmp_path) == before  # no ..old-* / ..partial-* folders, nothing replaced


def test_overwrite_refuses_the_current_folder_and_its_parents(art: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    top = tmp_path / "top"
    shutil.copytree(art, top)  # an artifact, but the user works inside it
    cwd = top / "inner"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _tree(tmp_path)
    for out in (str(top), str(cwd)):
        result = CliRunner().invoke(cli, ["compile", str(art), "-b", "onnxruntime", "-o", out, "--overwrite"])
        _one_line_error(result, "current folder")
    assert _tree(tmp_path) == before


def test_overwrite_still_replaces_an_artifact(art: Path, tmp_path: Path) -> None:
    out = tmp_path / "engine"
    runner = CliRunner()
    assert runner.invoke(cli, ["compile", str(art), "-b", "onnxruntime", "-o", str(out)]).exit_code == 0
    first = json.loads((out / "manifest.json").read_text())
    result = runner.invoke(cli, ["compile", str(art), "-b", "onnxruntime", "-o", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["kind"] == first["kind"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "engine"]


def test_the_library_refuses_as_the_cli_does(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("a")
    with pytest.raises(ArtifactError, match="replaces only an enginekit artifact folder"):
        with atomic_artifact(mine, overwrite=True):
            raise AssertionError("the block must not run")
    src = tmp_path / "p" / "src"
    src.mkdir(parents=True)
    (tmp_path / "p" / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactError, match="is the input"):
        with atomic_artifact(tmp_path / "p", overwrite=True, inputs=(src,)):
            raise AssertionError("the block must not run")
    assert (mine / "a.txt").read_text() == "a" and src.is_dir()


def test_bench_report_overwrite_keeps_a_folder_of_other_files(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text("mine")
    with pytest.raises(ArtifactError):
        with atomic_folder(docs, overwrite=True, marker="report.md"):
            raise AssertionError("the block must not run")
    assert (docs / "guide.md").read_text() == "mine"


# ---------------------------------------------------------------------------- refused numbers


@pytest.mark.parametrize("flag", [["--atol", "nan"], ["--atol", "inf"], ["--atol", "-1"], ["--rtol", "nan"],
                                  ["--opset", "3"], ["--opset", "99"]])
def test_export_refuses_numbers_that_break_the_gate(tiny_timm_dir: Path, tmp_path: Path, flag: list[str]) -> None:
    out = tmp_path / "onnx"
    result = CliRunner().invoke(cli, ["export", str(tiny_timm_dir), "-o", str(out), *flag])
    _one_line_error(result, flag[0])
    assert list(tmp_path.iterdir()) == []


def test_the_manifest_records_the_graphs_own_opset(exported: dict) -> None:
    from enginekit.export.provenance import graph_opset

    manifest = json.loads((exported["timm"] / "manifest.json").read_text())
    assert manifest["provenance"]["tools"]["opset"] == graph_opset(exported["timm"] / "model.onnx") == 18


@pytest.mark.parametrize("backend", backend_params())
def test_compile_refuses_a_batch_no_engine_can_take(art: Path, tmp_path: Path, backend: str) -> None:
    out = tmp_path / "big"
    result = CliRunner().invoke(cli, ["compile", str(art), "-b", backend, "--batch", "100000000", "-o", str(out)])
    _one_line_error(result, "largest static batch")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.parametrize("backend", backend_params())
def test_compile_refuses_a_missing_gpu(art: Path, tmp_path: Path, backend: str) -> None:
    from enginekit.registry import get_backend

    if any(d.split(".")[0] in ("gpu", "cuda") for d in get_backend(backend).devices()):
        pytest.skip(f"{backend} has a GPU here")
    out = tmp_path / "gpu"
    result = CliRunner().invoke(cli, ["compile", str(art), "-b", backend, "-d", "gpu", "-o", str(out)])
    _one_line_error(result, "not available here")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ---------------------------------------------------------------------------- full disk


@pytest.fixture()
def full_disk(tmp_path: Path):  # noqa: ANN201
    """A 4 MB tmpfs filled to the last byte (skipped where this process may not mount)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for block in (65536, 4096, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * block)
                except OSError:
                    pass
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _nothing_half_written(mnt: Path) -> None:
    assert sorted(p.name for p in mnt.iterdir()) == ["filler"], list(mnt.iterdir())


def test_a_stream_write_failure_on_a_nearly_full_disk_names_the_disk(tmp_path: Path, monkeypatch) -> None:
    """OpenVINO's serializer fails a large block that does not fit with only "iostream error",
    leaving megabytes free: with under 1 GB free that is the disk; with room to spare it is not."""
    from enginekit import outputs
    from enginekit.errors import BackendError

    exc = BackendError("openvino could not convert unet/model.onnx: basic_ios::clear: iostream error")
    monkeypatch.setattr(outputs, "_free_bytes", lambda path: 40 * 1024 * 1024)
    full = outputs.disk_full(exc, tmp_path / "engine")
    assert full is not None and "no space left on device" in str(full) and "41.9 MB free" in str(full)
    assert outputs.disk_full(BackendError("openvino could not convert: bad opset"), tmp_path / "engine") is None
    monkeypatch.setattr(outputs, "_free_bytes", lambda path: 3 * 1024**3)
    assert outputs.disk_full(exc, tmp_path / "engine") is None
    # with room left after the failure (the partial block went), the error still says the space and the usual cause
    note = outputs.stream_failure_note(exc, tmp_path / "engine")
    assert "3221.2 MB free" in note and "full disk is the usual cause" in note
    assert outputs.stream_failure_note(BackendError("openvino could not convert: bad opset"), tmp_path) == ""


def test_full_disk_export(tiny_timm_dir: Path, full_disk: Path) -> None:
    result = CliRunner().invoke(cli, ["export", str(tiny_timm_dir), "-o", str(full_disk / "onnx")])
    _one_line_error(result, "no space left on device at")
    _nothing_half_written(full_disk)


@pytest.mark.parametrize("backend", backend_params())
def test_full_disk_compile(art: Path, full_disk: Path, backend: str) -> None:
    result = CliRunner().invoke(cli, ["compile", str(art), "-b", backend, "-o", str(full_disk / "engine")])
    _one_line_error(result, "no space left on device at")
    _nothing_half_written(full_disk)


def test_full_disk_quantize(art: Path, full_disk: Path) -> None:
    result = CliRunner().invoke(cli, ["quantize", str(art), "-m", "int8-dynamic", "-o", str(full_disk / "q")])
    _one_line_error(result, "no space left on device at")
    _nothing_half_written(full_disk)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

    out = tmp_path_factory.getbasetemp() / "hostile-sd-shared"  # shared with test_hostile_inputs
    if not (out / "manifest.json").is_file():
        export_pipeline("tiny-sd15", out, PipelineExportOptions(image_check=False))
    return out


def test_full_disk_generate(tiny_sd: Path, full_disk: Path) -> None:
    result = CliRunner().invoke(cli, ["generate", str(tiny_sd), "a cat", "--steps", "2", "-o",
                                      str(full_disk / "cat.png")])
    _one_line_error(result, "no space left on device at")
    _nothing_half_written(full_disk)


def test_generated_images_are_written_0644(tiny_sd: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(cli, ["generate", str(tiny_sd), "a cat", "--steps", "2", "-o",
                                          str(tmp_path / "cat.png")])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "cat.png").stat().st_mode) == 0o644


def test_artifacts_and_reports_are_written_0644(art: Path, tmp_path: Path) -> None:
    from enginekit.api import compile_artifact

    old = os.umask(0o022)
    try:
        compile_artifact(art, "onnxruntime", tmp_path / "e")
        with atomic_folder(tmp_path / "report", marker="report.md") as tmp:
            (tmp / "report.md").write_text("# r")
    finally:
        os.umask(old)
    for root in (tmp_path / "e", tmp_path / "report"):
        assert stat.S_IMODE(root.stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()} == {0o644}


# ---------------------------------------------------------------------------- stale temporaries


_WRITER = """
import sys, time
from enginekit.artifact import atomic_folder
with atomic_folder(sys.argv[1]) as tmp:
    (tmp / "big.bin").write_bytes(b"x" * 100000)
    print("ready", flush=True)
    time.sleep(600)
"""


def _killed_writer(out: Path) -> int:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=str(ROOT))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=20)
    return proc.pid


def test_doctor_lists_and_cleans_stale_partials(tmp_path: Path) -> None:
    deep = tmp_path / "runs" / "a"
    deep.mkdir(parents=True)
    pid = _killed_writer(deep / "engine")
    stale = [p for p in deep.iterdir() if p.name.startswith(".engine.partial-")]
    assert len(stale) == 1
    runner = CliRunner()
    with atomic_folder(tmp_path / "live") as live:  # this process still writes it: never stale
        listed = runner.invoke(cli, ["doctor", "--scan", str(tmp_path)])
        assert listed.exit_code == 0, listed.output
        assert str(stale[0]) in listed.output and f"pid {pid}" in listed.output
        assert live.name not in listed.output and stale[0].exists()
        as_json = runner.invoke(cli, ["doctor", "--scan", str(tmp_path), "--json"])
        assert as_json.exit_code == 0, as_json.output
        cleaned = runner.invoke(cli, ["doctor", "--scan", str(tmp_path), "--clean"])
        assert cleaned.exit_code == 0, cleaned.output
        assert not stale[0].exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live", "runs"]


def test_a_reused_pid_does_not_keep_a_stale_partial(tmp_path: Path) -> None:
    """The writer's start time is in the name: pid 1 runs, but it did not start then."""
    from enginekit.outputs import _host_tag, stale_partials

    fake = tmp_path / f".x.partial-{_host_tag()}-1-999999999999-abcd1234"
    fake.mkdir()
    assert [p.path for p in stale_partials([tmp_path])] == [fake]


def test_doctor_clean_needs_scan() -> None:
    _one_line_error(CliRunner().invoke(cli, ["doctor", "--clean"]), "--scan")
