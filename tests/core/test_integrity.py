"""Integrity and bad input: tampered engines, missing manifests, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import enginekit
from enginekit.artifact import atomic_artifact, check_onnx_external_data
from enginekit.errors import (
    ArtifactError,
    BackendUnavailableError,
    IntegrityError,
    ManifestError,
    ShapeError,
    UnknownBackendError,
)
from enginekit.registry import get_backend


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tampered_engine_is_refused_before_parsing(exported: dict, tmp_path: Path) -> None:
    art = _copy(exported["timm"], tmp_path / "a")
    data = bytearray((art / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        enginekit.load(art)


def test_truncated_engine_is_refused(compiled: dict, tmp_path: Path) -> None:
    for (source, kind), path in compiled.items():
        if source != "timm":
            continue
        art = _copy(path, tmp_path / kind)
        entry = json.loads((art / "manifest.json").read_text())["components"]["model"]["entry"]
        weights = art / ("model.bin" if kind == "openvino" else entry)
        weights.write_bytes(weights.read_bytes()[:100])
        with pytest.raises(IntegrityError, match="truncated"):
            enginekit.load(art)


def test_missing_file_and_missing_manifest(exported: dict, tmp_path: Path) -> None:
    art = _copy(exported["timm"], tmp_path / "a")
    (art / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match="model.onnx is missing"):
        enginekit.load(art)
    (art / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        enginekit.load(art)
    with pytest.raises(ManifestError, match="no such artifact"):
        enginekit.load(tmp_path / "nope")


def test_corrupt_manifest(exported: dict, tmp_path: Path) -> None:
    art = _copy(exported["timm"], tmp_path / "a")
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="unreadable manifest"):
        enginekit.load(art)
    (art / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ManifestError, match="schema_version 99"):
        enginekit.load(art)


def test_manifest_path_escaping_the_folder_is_refused(exported: dict, tmp_path: Path) -> None:
    art = _copy(exported["timm"], tmp_path / "a")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["components"]["model"]["files"][0]["path"] = "../outside.onnx"
    manifest["components"]["model"]["entry"] = "../outside.onnx"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="outside the artifact folder"):
        enginekit.load(art)


def test_onnx_external_data_outside_the_folder_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), name="w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight],
    )
    model = helper.make_model(graph)
    # Written by hand: onnx's own writer refuses '..', a crafted file need not.
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "64")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(IntegrityError, match="outside the artifact folder"):
        check_onnx_external_data(art, "model.onnx")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_artifact(out) as tmp:
            (tmp / "model.onnx").write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_refuses_existing_output(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        with atomic_artifact(tmp_path / "out"):
            pass


def test_export_failure_leaves_no_folder(tiny_timm_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from enginekit.errors import FidelityError
    from enginekit.export import vit
    from enginekit.export.vit import export_classifier

    out = tmp_path / "never"
    # A parity miss (a negative budget is refused up front): the check fails after the ONNX file is written.
    monkeypatch.setattr(vit, "compare_outputs", lambda ref, got: {"logits_max_abs": 1.0, "logits_cosine": 0.5,
                                                                  "embedding_max_abs": 1.0})
    with pytest.raises(FidelityError, match="misses its parity budget"):
        export_classifier(str(tiny_timm_dir), out)
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_unknown_and_unavailable_backends(exported: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnknownBackendError, match="unknown backend 'nope'; known backends: .*onnxruntime"):
        get_backend("nope")
    from enginekit.runtimes.openvino import OpenVINOBackend

    monkeypatch.setattr(OpenVINOBackend, "is_available", classmethod(lambda cls: False))
    with pytest.raises(BackendUnavailableError, match=r"pip install 'enginekit\[openvino\]'"):
        get_backend("openvino")


def test_an_onnx_export_runs_on_whichever_backend_is_installed(exported: dict, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Without a backend asked for, an ONNX export in an OpenVINO-only install runs on OpenVINO
    (said in the log); asked for by name, the missing backend is still an error."""
    from enginekit.runtimes.onnxruntime import OnnxRuntimeBackend
    from enginekit.runtimes.openvino import OpenVINOBackend

    if not OpenVINOBackend.is_available():
        pytest.skip("openvino is not installed")
    monkeypatch.setattr(OnnxRuntimeBackend, "is_available", classmethod(lambda cls: False))
    with caplog.at_level("INFO", logger="enginekit"), enginekit.load(exported["timm"], device="cpu") as clf:
        assert clf.backend == "openvino"
        assert clf.predict(np.zeros((40, 40, 3), np.uint8))[0].label
    assert "running this onnx artifact on openvino" in caplog.text
    with pytest.raises(BackendUnavailableError, match=r"pip install 'enginekit\[onnxruntime\]'"):
        enginekit.load(exported["timm"], backend="onnxruntime", device="cpu")
    monkeypatch.setattr(OpenVINOBackend, "is_available", classmethod(lambda cls: False))
    with pytest.raises(BackendUnavailableError, match=r"pip install 'enginekit\[onnxruntime\]'"):
        enginekit.load(exported["timm"], device="cpu")


def test_wrong_feed_is_a_shape_error(exported: dict) -> None:
    with enginekit.load(exported["timm"], device="cpu") as clf:
        with pytest.raises(ShapeError, match="axis 2 must be 32"):
            clf.run_pixels(np.zeros((1, 3, 16, 16), np.float32))
        with pytest.raises(ShapeError, match="dtype float64"):
            clf.run_pixels(np.zeros((1, 3, 32, 32)))


def _age(art: Path, seconds: float = 60.0) -> None:
    """Set every file's mtime into the past, as an engine built a while ago has."""
    import os
    import time

    past = time.time() - seconds
    for f in art.rglob("*"):
        os.utime(f, (past, past))


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    from enginekit import artifact

    hashed: list[Path] = []
    real = artifact.sha256_file
    monkeypatch.setattr(artifact, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    return hashed


def test_an_unchanged_engine_is_hashed_once(exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from enginekit.artifact import verify_artifact
    from enginekit.manifest import read_manifest

    art = _copy(exported["timm"], tmp_path / "a")
    _age(art)
    manifest = read_manifest(art)
    hashed = _count_hashes(monkeypatch)
    verify_artifact(art, manifest)
    assert len(hashed) == sum(len(c.files) for c in manifest.components.values())
    hashed.clear()
    verify_artifact(art, manifest)
    assert hashed == []  # remembered by stat identity
    verify_artifact(art, manifest, full=True)
    assert len(hashed) > 0  # inspect's full check hashes regardless
    hashed.clear()
    monkeypatch.setenv("ENGINEKIT_VERIFY", "full")
    verify_artifact(art, manifest)
    assert len(hashed) > 0


def test_an_edit_that_restores_size_and_mtime_is_still_caught(exported: dict, tmp_path: Path) -> None:
    import os

    from enginekit.artifact import verify_artifact
    from enginekit.manifest import read_manifest

    art = _copy(exported["timm"], tmp_path / "a")
    _age(art)
    manifest = read_manifest(art)
    verify_artifact(art, manifest)  # remembered
    model = art / "model.onnx"
    st = model.stat()
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(model, "r+b") as f:  # same inode, same size
        f.write(bytes(data))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back; ctime cannot be
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        verify_artifact(art, manifest)
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        enginekit.load(art)


def test_a_freshly_written_file_is_not_remembered(exported: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Written within the racy window: its mtime could survive one more write, so it is hashed again."""
    from enginekit.artifact import verify_artifact
    from enginekit.manifest import read_manifest

    art = _copy(exported["timm"], tmp_path / "a")
    (art / "model.onnx").touch()
    manifest = read_manifest(art)
    verify_artifact(art, manifest)
    hashed = _count_hashes(monkeypatch)
    verify_artifact(art, manifest)
    assert (art / "model.onnx").resolve() in [p.resolve() for p in hashed]


def test_an_unwritable_cache_only_costs_a_rehash(exported: dict, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from enginekit.artifact import verify_artifact
    from enginekit.manifest import read_manifest

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("ENGINEKIT_CACHE_DIR", str(blocker))
    art = _copy(exported["timm"], tmp_path / "a")
    _age(art)
    verify_artifact(art, read_manifest(art))
    verify_artifact(art, read_manifest(art))
    assert list(tmp_path.glob("**/verified")) == []
