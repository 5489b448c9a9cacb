"""Nothing trusted blindly: a manifest linked from outside the artifact, pins that a
forged verified-file record cannot satisfy, ``inspect --json`` that says what it
checked, pinned and signed models in the server, an engine that answers NaN, an
API key file others can write, and a key type model-signing does not take. Every
artifact is the tiny in-process classifier of test_integrity_holes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

import enginekit  # noqa: E402
from enginekit.app.cli import cli  # noqa: E402
from enginekit.errors import BackendError, InputError, IntegrityError  # noqa: E402
from enginekit.manifest import Manifest, read_manifest  # noqa: E402

from .test_integrity_holes import (  # noqa: E402
    _artifact,
    _edit_manifest,
    _forge_record,
    _keys,
    _one_line_error,
    _photo,
    _tamper,
)


@pytest.fixture()
def art(tmp_path: Path) -> Path:
    return _artifact(tmp_path / "art")


# The manifest is inside what is pinned -----------------------------------------------------


def test_a_manifest_linked_from_outside_is_refused(art: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_bytes((art / "manifest.json").read_bytes())
    (art / "manifest.json").unlink()
    (art / "manifest.json").symlink_to(outside)
    with pytest.raises(IntegrityError, match="manifest.json is a symlink to a file outside"):
        enginekit.load(art)
    _one_line_error(CliRunner().invoke(cli, ["inspect", str(art)]), "symlink to a file outside")


def test_a_payload_linked_from_outside_is_refused(art: Path, tmp_path: Path) -> None:
    outside = tmp_path / "model.onnx"
    outside.write_bytes((art / "model.onnx").read_bytes())
    (art / "model.onnx").unlink()
    (art / "model.onnx").symlink_to(outside)
    with pytest.raises(IntegrityError, match="outside the artifact folder"):
        enginekit.load(art)


def test_the_digest_covers_what_the_runtime_reads(art: Path) -> None:
    before = read_manifest(art).digest()
    for edit in (lambda d: d["image-classification"]["preprocessing"].update(mean=[0.4, 0.5, 0.5]),
                 lambda d: d["image-classification"]["labels"].reverse(),
                 lambda d: d["target"].update(intra_op_num_threads=1),
                 lambda d: d["components"]["model"]["files"][0].update(size=1)):
        data = json.loads((art / "manifest.json").read_text())
        edit(data)
        assert Manifest.from_dict(data).digest() != before


# The verified-file cache cannot vouch for a pinned or signed load ----------------------------


def test_a_forged_cache_record_does_not_satisfy_a_pin(art: Path) -> None:
    manifest = read_manifest(art)
    digest = manifest.digest()
    _tamper(art)
    _forge_record(art, digest)  # the tampered file's new stat, under the old sha256
    with enginekit.load(art):  # unpinned: the documented same-user limit of the cache
        pass
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        enginekit.load(art, digest=digest)


def test_a_forged_cache_record_does_not_satisfy_a_served_pin(art: Path) -> None:
    pytest.importorskip("fastapi")
    from enginekit.serve.app import create_app
    from enginekit.serve.settings import ServeSettings
    from enginekit.serve.testing import AppRunner

    digest = read_manifest(art).digest()
    _tamper(art)
    _forge_record(art, digest)
    settings = ServeSettings(warmup=False, pins={"clf": f"sha256:{digest}"})
    with AppRunner(create_app({"clf": art}, settings)) as client:
        ready = client.get("/v2/health/ready").json()
        assert ready["models"]["clf"]["state"] == "failed"
        assert "does not match its sha256" in ready["models"]["clf"]["reason"]


def test_a_forged_cache_record_does_not_satisfy_the_server_even_unpinned(art: Path) -> None:
    pytest.importorskip("fastapi")
    from enginekit.serve.app import create_app
    from enginekit.serve.settings import ServeSettings
    from enginekit.serve.testing import AppRunner

    digest = read_manifest(art).digest()
    _tamper(art)
    _forge_record(art, digest)
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        enginekit.load(art, hash_all=True)
    with AppRunner(create_app({"clf": art}, ServeSettings(warmup=False))) as client:
        ready = client.get("/v2/health/ready").json()
        assert ready["models"]["clf"]["state"] == "failed"
        assert "does not match its sha256" in ready["models"]["clf"]["reason"]


# inspect --json --------------------------------------------------------------------------------


def test_inspect_json_reports_digest_integrity_pin_and_signature(art: Path, tmp_path: Path) -> None:
    digest = read_manifest(art).digest()
    result = CliRunner().invoke(cli, ["inspect", str(art), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) == {"artifact", "digest", "integrity", "pin", "signature", "manifest"}
    assert report["digest"] == f"sha256:{digest}"
    assert report["integrity"] == {"verdict": "ok", "detail": None}
    assert report["pin"] == {"expected": None, "verdict": "not pinned"}
    assert report["signature"]["verdict"] == "unsigned" and report["signature"]["key"] is None
    assert report["manifest"]["image-classification"]["labels"] == ["a", "b", "c", "d"]
    pinned = json.loads(CliRunner().invoke(cli, ["inspect", str(art), "--json", "--digest", digest]).output)
    assert pinned["pin"] == {"expected": f"sha256:{digest}", "verdict": "match"}

    _edit_manifest(art, lambda d: d["image-classification"]["preprocessing"].update(mean=[0.4, 0.5, 0.5]))
    result = CliRunner().invoke(cli, ["inspect", str(art), "--json", "--digest", digest])
    assert result.exit_code == 1
    report = json.loads(result.output[: result.output.rindex("}") + 1])
    assert report["pin"]["verdict"] == "mismatch" and report["digest"] != f"sha256:{digest}"
    assert "manifest digest is sha256:" in result.output.strip().splitlines()[-1]
    _one_line_error(CliRunner().invoke(cli, ["inspect", str(art), "--digest", digest]), "expected sha256:")

    _tamper(art)
    report = json.loads(CliRunner().invoke(cli, ["inspect", str(art), "--json"]).output.rsplit("\nError", 1)[0])
    assert report["integrity"]["verdict"] == "failed" and "does not match its sha256" in report["integrity"]["detail"]


def test_inspect_says_who_signed_and_what_changed_since(art: Path, tmp_path: Path) -> None:
    pytest.importorskip("model_signing")
    from enginekit.signing import key_fingerprint

    private, public = _keys(tmp_path)
    assert CliRunner().invoke(cli, ["sign", str(art), "--key", str(private)]).exit_code == 0
    report = json.loads(CliRunner().invoke(cli, ["inspect", str(art), "--json"]).output)
    assert report["signature"] == {"verdict": "unverified", "key": key_fingerprint(public), "changed": [],
                                   "detail": None}
    text = CliRunner().invoke(cli, ["inspect", str(art), "--verify-with", str(public)])
    assert text.exit_code == 0 and f"signed by key {key_fingerprint(public)}: verified" in text.output, text.output

    _edit_manifest(art, lambda d: d["image-classification"]["preprocessing"].update(mean=[0.4, 0.5, 0.5]))
    result = CliRunner().invoke(cli, ["inspect", str(art), "--json"])  # no key needed to see the edit
    assert result.exit_code == 1
    report = json.loads(result.output[: result.output.rindex("}") + 1])
    assert report["integrity"]["verdict"] == "ok"  # every payload file still matches the (edited) manifest
    assert report["signature"]["verdict"] == "failed" and report["signature"]["changed"] == ["manifest.json"]
    _one_line_error(CliRunner().invoke(cli, ["inspect", str(art)]), "changed since it was signed: manifest.json")


def test_sign_with_an_rsa_key_is_one_line(art: Path, tmp_path: Path) -> None:
    pytest.importorskip("model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = tmp_path / "rsa.pem", tmp_path / "rsa.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    result = CliRunner().invoke(cli, ["sign", str(art), "--key", str(private)])
    _one_line_error(result, "the key is RSA; enginekit sign and --verify-with take elliptic-curve keys on P-256")
    assert not (art / "signature.sig").exists()
    ec_private, _ = _keys(tmp_path)
    assert CliRunner().invoke(cli, ["sign", str(art), "--key", str(ec_private)]).exit_code == 0
    with pytest.raises(IntegrityError, match="the key is RSA"):
        enginekit.load(art, verify_with=public)


# Pinned and signed models in the server ------------------------------------------------------


def test_serve_specs_carry_pins() -> None:
    from enginekit.serve.settings import parse_model_pins, parse_model_specs

    hex_ = "AB" * 32
    specs = [f"clf=out/x@sha256:{hex_}", "out/y", "z=out/z"]
    assert parse_model_specs(specs) == {"clf": Path("out/x"), "y": Path("out/y"), "z": Path("out/z")}
    assert parse_model_pins(specs) == {"clf": f"sha256:{hex_.lower()}"}
    with pytest.raises(InputError, match="64 hex digits"):
        parse_model_specs(["clf=out/x@sha256:abc"])


def test_served_pins_and_signatures(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("model_signing")
    from enginekit.serve.app import create_app
    from enginekit.serve.settings import ServeSettings
    from enginekit.serve.testing import AppRunner
    from enginekit.signing import sign_artifact

    good, edited = _artifact(tmp_path / "good"), _artifact(tmp_path / "edited")
    private, public = _keys(tmp_path)
    _, other = _keys(tmp_path, "other")
    for folder in (good, edited):
        sign_artifact(folder, private)
    pins = {name: f"sha256:{read_manifest(folder).digest()}" for name, folder in (("good", good), ("edited", edited))}
    _edit_manifest(edited, lambda d: d["image-classification"]["preprocessing"].update(mean=[0.4, 0.5, 0.5]))

    with AppRunner(create_app({"good": good, "edited": edited}, ServeSettings(warmup=False, pins=pins))) as client:
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503
        models = ready.json()["models"]
        assert models["good"]["ready"] and models["good"]["pinned"] == pins["good"]
        assert not models["edited"]["ready"] and "expected " + pins["edited"] in models["edited"]["reason"]
        assert client.get("/v2/models/edited/ready").json()["reason"] == models["edited"]["reason"]
        answer = client.post("/v1/classify", data={"model": "good"}, files={"file": ("p.png", _png_bytes())})
        assert answer.status_code == 200, answer.text
        refused = client.post("/v1/classify", data={"model": "edited"},
                              files={"file": ("p.png", _png_bytes())})
        assert refused.status_code == 503 and "not ready" in refused.json()["error"]

    settings = ServeSettings(warmup=False, verify_with=str(public))
    with AppRunner(create_app({"good": good, "edited": edited}, settings)) as client:
        models = client.get("/v2/health/ready").json()["models"]
        assert models["good"]["ready"]
        assert "signature does not verify" in models["edited"]["reason"]
    with AppRunner(create_app({"good": good}, ServeSettings(warmup=False, verify_with=str(other)))) as client:
        assert "signature does not verify" in client.get("/v2/health/ready").json()["models"]["good"]["reason"]


def _png_bytes() -> bytes:
    from .test_integrity_holes import _png

    return _png(_photo())


def test_serve_cli_passes_pins_and_key(art: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_run_server(models, settings, **kwargs):
        seen.update(models=models, settings=settings)

    monkeypatch.setattr("enginekit.serve.server.run_server", fake_run_server)
    digest = read_manifest(art).digest()
    _, public = _keys(tmp_path)
    result = CliRunner().invoke(cli, ["serve", f"clf={art}@sha256:{digest}", "--verify-with", str(public)])
    assert result.exit_code == 0, result.output
    assert seen["models"] == {"clf": art}
    assert seen["settings"].pins == {"clf": f"sha256:{digest}"}
    assert seen["settings"].verify_with == str(public.resolve())


# An engine that answers NaN ------------------------------------------------------------------


def test_nan_engine_output_is_an_error(art: Path, tmp_path: Path) -> None:
    model = onnx.load(str(art / "model.onnx"))
    weights = model.graph.initializer[0]
    weights.CopyFrom(numpy_helper.from_array(np.full((3, 4), np.nan, np.float32), weights.name))
    broken = tmp_path / "nan"
    from enginekit.artifact import atomic_artifact, make_component, write_manifest

    manifest = read_manifest(art)
    with atomic_artifact(broken) as tmp:
        onnx.save(model, str(tmp / "model.onnx"))
        comp = manifest.component()
        comp = make_component(tmp, "model", "model.onnx", ["model.onnx"], comp.inputs, comp.outputs)
        write_manifest(tmp, manifest.replace(components={"model": comp}))
    with enginekit.load(broken) as clf:
        with pytest.raises(BackendError, match="output 'logits' holds NaN"):
            clf.predict(_photo())
    result = CliRunner().invoke(cli, ["predict", str(broken), str(_write_png(tmp_path))])
    _one_line_error(result, "output 'logits' holds NaN")


def _write_png(folder: Path) -> Path:
    path = folder / "p.png"
    path.write_bytes(_png_bytes())
    return path


# The API key file ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_an_api_key_file_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    pytest.importorskip("fastapi")
    from enginekit.serve.settings import read_api_keys

    keys = tmp_path / "keys"
    keys.write_text("secret-key\n")
    keys.chmod(0o600)
    assert read_api_keys(keys) == frozenset({"secret-key"})
    keys.chmod(mode)
    with pytest.raises(InputError, match="group or others can write it; chmod 600"):
        read_api_keys(keys)
    result = CliRunner().invoke(cli, ["serve", str(tmp_path), "--api-key-file", str(keys)])
    _one_line_error(result, "group or others can write it")
