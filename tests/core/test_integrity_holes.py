"""Integrity holes, closed: unlisted external data, an unprotected manifest (digest
pins and signatures), a forgeable verified-file cache, racing and interrupted
writers, tracebacks where one line was promised, and hostile images. Every
artifact is a tiny in-process classifier (a mean-pool and a 3x4 matmul)."""

from __future__ import annotations

import re

import io
import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import enginekit  # noqa: E402
from enginekit.app.cli import cli  # noqa: E402
from enginekit.artifact import (  # noqa: E402
    _stat_key,
    _verified_path,
    atomic_artifact,
    atomic_folder,
    make_component,
    verify_artifact,
    write_manifest,
)
from enginekit.errors import ArtifactError, ImageError, InputError, IntegrityError, ManifestError  # noqa: E402
from enginekit.manifest import Manifest, TensorSpec, read_manifest  # noqa: E402
from enginekit.runtimes.images import load_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["a", "b", "c", "d"]
PREPROCESSING = {"size": [8, 8], "resize": "exact", "resize_size": [8, 8], "interpolation": "bilinear",
                 "center_crop": False, "rescale_factor": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def _classifier_model() -> onnx.ModelProto:
    weights = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixel_values"], ["embedding"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["embedding", "w"], ["logits"])],
        "tiny-classifier",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _artifact(out: Path, *, external: str | None = None, list_external: bool = True,
              labels: Any = LABELS, preprocessing: Any = None, target: dict | None = None) -> Path:
    """A classifier artifact; ``external`` saves the weights to that external-data file."""
    with atomic_artifact(out) as tmp:
        files = ["model.onnx"]
        if external:
            onnx.save_model(_classifier_model(), str(tmp / "model.onnx"), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=external, size_threshold=0)
            files += [external] if list_external else []
        else:
            onnx.save(_classifier_model(), str(tmp / "model.onnx"))
        comp = make_component(tmp, "model", "model.onnx", files,
                              [TensorSpec("pixel_values", "float32", ("batch", 3, 8, 8))],
                              [TensorSpec("logits", "float32", ("batch", 4)),
                               TensorSpec("embedding", "float32", ("batch", 3))])
        manifest = Manifest(kind="onnx", task="image-classification", family="vit", components={"model": comp},
                            task_config={"preprocessing": preprocessing or PREPROCESSING, "labels": labels},
                            target=target or {})
        write_manifest(tmp, manifest)
    return out


def _edit_manifest(art: Path, edit: Any) -> None:
    data = json.loads((art / "manifest.json").read_text())
    edit(data)
    (art / "manifest.json").write_text(json.dumps(data))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _photo(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def _one_line_error(result: Any, needle: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("Error: ") and needle in lines[-1], result.output


@pytest.fixture()
def art(tmp_path: Path) -> Path:
    return _artifact(tmp_path / "art")


# 1. Unlisted external data ------------------------------------------------------------------


def test_unlisted_external_data_is_refused(tmp_path: Path) -> None:
    listed = _artifact(tmp_path / "listed", external="weights.data")
    with enginekit.load(listed) as clf:
        assert len(clf.predict(_photo())) == 1
    art = _artifact(tmp_path / "unlisted", external="weights.data", list_external=False)
    with pytest.raises(IntegrityError, match=r"model.onnx reads weights.data, which component 'model' does not list"):
        enginekit.load(art)
    result = CliRunner().invoke(cli, ["inspect", str(art)])
    _one_line_error(result, "weights.data")


def test_external_data_of_an_entry_with_another_name_is_checked(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "a", external="w.bin", list_external=False)
    os.rename(art / "model.onnx", art / "graph.pb")
    _edit_manifest(art, lambda d: d["components"]["model"].update(
        entry="graph.pb", files=[{**d["components"]["model"]["files"][0], "path": "graph.pb"}]))
    with pytest.raises(IntegrityError, match="graph.pb reads w.bin"):
        verify_artifact(art, read_manifest(art), full=True)


def test_openvino_ir_must_list_its_bin(tmp_path: Path) -> None:
    from enginekit.artifact import file_entry

    (tmp_path / "model.xml").write_text("<net/>")
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    spec = [TensorSpec("x", "float32", (1,))]
    comp = make_component(tmp_path, "model", "model.xml", ["model.xml"], spec, spec)
    manifest = Manifest(kind="openvino", task="image-classification", family="vit", components={"model": comp})
    with pytest.raises(IntegrityError, match="model.xml reads model.bin"):
        verify_artifact(tmp_path, manifest, full=True)
    comp = comp.replace(files=(*comp.files, file_entry(tmp_path, "model.bin")))
    verify_artifact(tmp_path, manifest.replace(components={"model": comp}), full=True)


# 2. Manifest digest and signatures -----------------------------------------------------------


def test_digest_pins_the_manifest(art: Path) -> None:
    digest = read_manifest(art).digest()
    result = CliRunner().invoke(cli, ["inspect", str(art)])
    assert result.exit_code == 0 and f"sha256:{digest}" in result.output.replace("\n", ""), result.output
    with enginekit.load(art, digest=digest) as clf:
        before = clf.logits(_photo())
    with enginekit.load(art, digest=f"sha256:{digest.upper()}"):
        pass
    _edit_manifest(art, lambda d: d["image-classification"]["preprocessing"].update(mean=[0.4, 0.5, 0.5]))
    with enginekit.load(art) as clf:  # unpinned: the edit goes through, and changes the answer
        assert not np.allclose(clf.logits(_photo()), before)
    with pytest.raises(IntegrityError, match=f"expected sha256:{digest}"):
        enginekit.load(art, digest=digest)
    result = CliRunner().invoke(cli, ["predict", str(art), str(_write_photo(art.parent)), "--digest", digest])
    _one_line_error(result, "manifest digest is sha256:")


def _write_photo(folder: Path, name: str = "p.png", seed: int = 0) -> Path:
    path = folder / name
    path.write_bytes(_png(_photo(seed)))
    return path


def _keys(folder: Path, name: str = "key") -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_sign_and_verify_with(art: Path, tmp_path: Path) -> None:
    pytest.importorskip("model_signing")
    private, public = _keys(tmp_path)
    _, other = _keys(tmp_path, "other")
    with pytest.raises(IntegrityError, match="not signed"):
        enginekit.load(art, verify_with=public)
    result = CliRunner().invoke(cli, ["sign", str(art), "--key", str(private)])
    assert result.exit_code == 0, result.output
    assert (art / "signature.sig").is_file()
    verify_artifact(art, read_manifest(art), full=True)  # the signature is not a payload file
    with enginekit.load(art, verify_with=public) as clf:
        assert len(clf.predict(_photo())) == 1
    with pytest.raises(IntegrityError, match="signature does not verify"):
        enginekit.load(art, verify_with=other)
    photo = _write_photo(tmp_path)
    result = CliRunner().invoke(cli, ["predict", str(art), str(photo), "--verify-with", str(public)])
    assert result.exit_code == 0, result.output
    _edit_manifest(art, lambda d: d["image-classification"]["preprocessing"].update(mean=[0.4, 0.5, 0.5]))
    with pytest.raises(IntegrityError, match="signature does not verify"):
        enginekit.load(art, verify_with=public)
    result = CliRunner().invoke(cli, ["predict", str(art), str(photo), "--verify-with", str(public)])
    _one_line_error(result, "signature does not verify")


def test_sign_extra_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    extras = re.search(r'^all = \["enginekit\[([^\]]*)\]"\]', text, re.M)
    assert 'sign = ["model-signing' in text and extras and "sign" in extras.group(1).split(",")


# 3. The verified-file cache ------------------------------------------------------------------


def _forge_record(art: Path, digest: str) -> Path:
    """What a tamperer would write: the tampered file's new stat under the old sha256."""
    manifest = read_manifest(art)
    entry = manifest.component().files[0]
    path = _verified_path(art)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = {"root": str(art.resolve()), "manifest_sha256": digest,
              "files": {entry.path: {"sha256": entry.sha256, "stat": _stat_key(os.stat(art / entry.path))}}}
    path.write_text(json.dumps(record))
    path.chmod(0o600)
    return path


def _tamper(art: Path) -> None:
    """Change one weight in place: same size, still a valid graph, different answers."""
    data = (art / "model.onnx").read_bytes()
    weights = (np.arange(12, dtype=np.float32).reshape(3, 4) / 10).tobytes()
    at = data.index(weights)
    tampered = np.frombuffer(weights, np.float32).copy()
    tampered[0] = 9.0
    (art / "model.onnx").write_bytes(data[:at] + tampered.tobytes() + data[at + len(weights):])


def test_cache_records_are_bound_to_the_manifest_digest(art: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINEKIT_CACHE_DIR", str(tmp_path / "cache"))
    manifest = read_manifest(art)
    _tamper(art)
    _forge_record(art, "0" * 64)  # made for another manifest: ignored, the file is hashed
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        verify_artifact(art, manifest)
    # The documented limit: a same-user attacker who forges a record for this manifest wins.
    _forge_record(art, manifest.digest())
    verify_artifact(art, manifest)
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        verify_artifact(art, manifest, full=True)


@pytest.mark.parametrize("loose", ["record", "folder"])
def test_cache_others_can_write_is_not_trusted(art: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               loose: str) -> None:
    monkeypatch.setenv("ENGINEKIT_CACHE_DIR", str(tmp_path / "cache"))
    manifest = read_manifest(art)
    _tamper(art)
    record = _forge_record(art, manifest.digest())
    (record if loose == "record" else record.parent).chmod(0o666 if loose == "record" else 0o777)
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        verify_artifact(art, manifest)


def test_cache_folder_is_created_owner_only(art: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINEKIT_CACHE_DIR", str(tmp_path / "cache"))
    os.utime(art / "model.onnx", (1_000_000_000, 1_000_000_000))  # old enough to be remembered
    verify_artifact(art, read_manifest(art))
    record = _verified_path(art)
    assert record.is_file()
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    assert record.parent.stat().st_mode & 0o777 == 0o700
    assert record.stat().st_mode & 0o077 == 0
    assert json.loads(record.read_text())["manifest_sha256"] == read_manifest(art).digest()


def test_threat_model_is_documented() -> None:
    import enginekit.artifact

    doc = enginekit.artifact.__doc__ or ""
    assert "Threat model" in doc and "same user" in doc


# 4. Concurrent writers -----------------------------------------------------------------------


def test_two_writers_one_wins(tmp_path: Path) -> None:
    out = tmp_path / "F"
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def write(tag: str) -> None:
        try:
            with atomic_folder(out) as tmp:
                (tmp / "who").write_text(tag)
                barrier.wait(timeout=10)
            outcomes.append(f"wrote {tag}")
        except ArtifactError as exc:
            outcomes.append(f"refused: {exc}")

    threads = [threading.Thread(target=write, args=(tag,)) for tag in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    wrote = [o for o in outcomes if o.startswith("wrote")]
    refused = [o for o in outcomes if o.startswith("refused")]
    assert len(wrote) == 1 and len(refused) == 1, outcomes
    assert "appeared while this stage ran" in refused[0] and "\n" not in refused[0]
    assert (out / "who").read_text() == wrote[0].split()[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["F"]  # the loser's temporary is gone


def test_an_empty_folder_that_appears_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "F"
    with pytest.raises(ArtifactError, match="appeared"):
        with atomic_folder(out) as tmp:
            (tmp / "x").write_text("x")
            out.mkdir()
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["F"]
    with atomic_folder(out, overwrite=True) as tmp:  # asked for: replaced
        (tmp / "x").write_text("x")
    assert (out / "x").read_text() == "x"


# 5. Interrupted stages -----------------------------------------------------------------------

_WRITER = """
import sys, time
from pathlib import Path
from enginekit.app.cli import _install_signal_handlers
from enginekit.artifact import atomic_folder
import signal
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as from a terminal, whatever (nohup) started the tests
_install_signal_handlers()
try:
    with atomic_folder(sys.argv[1]) as tmp:
        (Path(tmp) / "half").write_text("x")
        print("ready", flush=True)
        time.sleep(60)
except KeyboardInterrupt:
    sys.exit(130)
"""


def _start_writer(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=str(ROOT))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up(tmp_path: Path, signum: int) -> None:
    out = tmp_path / "F"
    proc = _start_writer(out)
    assert any(p.name.startswith(".F.partial-") for p in tmp_path.iterdir())
    proc.send_signal(signum)
    assert proc.wait(timeout=20) == 130
    assert list(tmp_path.iterdir()) == []


def test_a_dead_writers_temporary_is_removed_by_the_next_write(tmp_path: Path) -> None:
    out = tmp_path / "F"
    proc = _start_writer(out)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.wait(timeout=20)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".F.partial-")]
    assert len(stale) == 1 and f"-{proc.pid}-" in stale[0].name
    (tmp_path / ".F.partial-unknown").mkdir()  # not ours to judge: left alone
    with atomic_folder(out) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".F.partial-unknown", "F"]


def test_cli_main_installs_the_handlers() -> None:
    code = ("import signal, enginekit.app.cli as c; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
            "c._install_signal_handlers(); "
            "print(signal.getsignal(signal.SIGTERM) is c._terminate, signal.getsignal(signal.SIGHUP) is c._terminate)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), check=True)
    assert out.stdout.split() == ["True", "True"]


# 6. One line, not a traceback ----------------------------------------------------------------


def test_labels_that_do_not_match_the_classes(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="3 labels for an engine with 4 classes"):
        enginekit.load(_artifact(tmp_path / "a", labels=["x", "y", "z"]))
    with pytest.raises(ManifestError, match="list of strings"):
        enginekit.load(_artifact(tmp_path / "b", labels="abcd"))
    with pytest.raises(ManifestError, match="list of strings"):
        enginekit.load(_artifact(tmp_path / "c", labels=[1, 2, 3, 4]))


def test_mistyped_target_option(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "a", target={"intra_op_num_threads": "x"})
    with pytest.raises(ManifestError, match="target.intra_op_num_threads: expected a non-negative integer"):
        enginekit.load(art)


@pytest.mark.parametrize("path", ["a\0b", "x" * 5000, "/tmp/" + "y" * 300])
def test_unusable_paths(path: str) -> None:
    with pytest.raises(ManifestError) as info:
        enginekit.load(path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    with pytest.raises(ImageError) as info:
        load_images(path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    result = CliRunner().invoke(cli, ["inspect", path])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_huge_preprocessing_size(tmp_path: Path) -> None:
    pre = {**PREPROCESSING, "size": [100000, 100000], "resize_size": [100000, 100000]}
    with pytest.raises(ManifestError, match=r"preprocessing.size: expected 2 integers in 1..8192"):
        enginekit.load(_artifact(tmp_path / "a", preprocessing=pre))


def test_extreme_aspect_ratio_is_refused(tmp_path: Path) -> None:
    from enginekit.runtimes.preprocess import Preprocessing, preprocess

    cfg = Preprocessing.from_dict({**PREPROCESSING, "resize": "shortest_edge", "resize_size": [224],
                                   "center_crop": True})
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        preprocess([Image.new("RGB", (1, 400_000))], cfg)


def test_corrupt_safetensors_header(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    bad = tmp_path / "w.safetensors"
    bad.write_bytes((10**6).to_bytes(8, "little") + b"{not json")
    result = CliRunner().invoke(cli, ["export", "timm:vit_tiny_patch16_224", "--weights", str(bad),
                                      "-o", str(tmp_path / "out")])
    _one_line_error(result, "not a readable safetensors file")
    assert not (tmp_path / "out").exists()


def test_bad_predict_arguments(art: Path) -> None:
    with pytest.raises(InputError, match="batch_size"):
        enginekit.load(art, batch_size=0)
    with enginekit.load(art) as clf:
        with pytest.raises(InputError, match="no images given"):
            clf.predict(None)
        with pytest.raises(InputError, match="not an image or a sequence"):
            clf.predict(42)
        with pytest.raises(InputError, match="top_k"):
            clf.predict(_photo(), top_k="3")


# 7. Images -----------------------------------------------------------------------------------


def test_pixel_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINEKIT_MAX_PIXELS", "100")
    for item in (np.zeros((20, 20, 3), np.uint8), _png(np.zeros((20, 20, 3), np.uint8)), Image.new("RGB", (20, 20))):
        with pytest.raises(ImageError, match=r"20x20 is 0.0 megapixels, over the limit of 0.0001 "
                                             r"\(set ENGINEKIT_MAX_PIXELS"):
            load_images(item)
    assert load_images(np.zeros((10, 10), np.uint8))[0].size == (10, 10)
    monkeypatch.setenv("ENGINEKIT_MAX_PIXELS", "lots")
    with pytest.raises(ImageError, match="ENGINEKIT_MAX_PIXELS"):
        load_images(np.zeros((10, 10), np.uint8))


def test_default_limit_is_below_pillows_bomb_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    from enginekit.runtimes.images import max_pixels

    monkeypatch.delenv("ENGINEKIT_MAX_PIXELS", raising=False)
    assert max_pixels() == 50_000_000 < Image.MAX_IMAGE_PIXELS
    # Where the limit is raised past Pillow's, Pillow's multi-line warning becomes one line too.
    monkeypatch.setenv("ENGINEKIT_MAX_PIXELS", str(10**9))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match="too many pixels for Pillow") as info:
            load_images(_png(np.zeros((10, 10, 3), np.uint8)))
    assert "\n" not in str(info.value)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    levels = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)
    image = load_images(path)[0]
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image)[0], [0, 1, 128, 255])


def test_nan_is_refused(art: Path) -> None:
    nan = np.full((8, 8, 3), np.nan, np.float32)
    with pytest.raises(ImageError, match="NaN"):
        load_images(nan)
    with pytest.raises(ImageError, match="NaN"):
        load_images(Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F"))
    with enginekit.load(art) as clf:
        with pytest.raises(InputError, match="NaN"):
            clf.run_pixels(np.full((1, 3, 8, 8), np.nan, np.float32))


def test_encoded_bytes_are_one_image(art: Path) -> None:
    data = _png(_photo())
    with enginekit.load(art) as clf:
        preds = clf.predict(data)
        assert len(preds) == 1
        assert preds[0] == clf.predict([bytearray(data)])[0] == clf.predict(_photo())[0]


def test_predict_skip_bad_and_json(art: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _write_photo(folder, "a.png", 1)
    (folder / "b.png").write_bytes(b"not a png")
    _write_photo(folder, "c.png", 2)
    (folder / "d.jpg").write_bytes(_png(_photo(3))[:40])  # truncated
    runner = CliRunner()
    result = runner.invoke(cli, ["predict", str(art), str(folder), "--json"])
    _one_line_error(result, "b.png")
    result = runner.invoke(cli, ["predict", str(art), str(folder), "--json", "--skip-bad", "-k", "2"])
    assert result.exit_code == 0, result.output

    def no_nan(token: str) -> None:
        raise AssertionError(f"bare {token} in --json output")

    data = json.loads(result.stdout, parse_constant=no_nan)
    assert [Path(d["image"]).name for d in data] == ["a.png", "b.png", "c.png", "d.jpg"]
    assert {"label", "index", "score", "top_k"} <= set(data[0]) and len(data[0]["top_k"]) == 2
    assert set(data[1]) == {"image", "error"} and "b.png" in data[1]["error"]
    assert "skipped 2 of 4" in result.stderr and "d.jpg" in result.stderr
    table = runner.invoke(cli, ["predict", str(art), str(folder), "--skip-bad"])
    assert table.exit_code == 0 and "a.png" in table.stdout and "skipped 2 of 4" in table.stderr
    help_text = runner.invoke(cli, ["predict", "--help"]).output
    assert "JSON array" in help_text
    (folder / "a.png").write_bytes(b"x")
    (folder / "c.png").write_bytes(b"x")
    _one_line_error(runner.invoke(cli, ["predict", str(art), str(folder), "--skip-bad"]), "none of the 4")
