"""Strict inputs: hostile JSON nesting in a request or a manifest, a client that leaves
mid-body, the SSE error status, and Python API arguments of the wrong kind: each a 4xx
or a one-line error, never a 500, a traceback or a hang."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

import enginekit
from enginekit.errors import EngineKitError, ImageError, InputError, ManifestError

from ..conftest import make_photo

DEEP = "[" * 100_000 + "]" * 100_000
KEY = "k" * 32


@pytest.fixture(scope="module")
def clf(exported: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile-clf") / "clf"
    shutil.copytree(exported["timm"], out)
    return out


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd15 exported once per session (shared with test_hostile_files through the base temp)."""
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

    out = tmp_path_factory.getbasetemp() / "hostile-sd-shared"
    if not (out / "manifest.json").is_file():
        export_pipeline("tiny-sd15", out, PipelineExportOptions(image_check=False))
    return out


# ---------------------------------------------------------------------------- Python API


@pytest.mark.parametrize("path", [None, 5, 3.5, b"bytes", ["a"]])
def test_load_refuses_a_path_of_the_wrong_type(path: object) -> None:
    with pytest.raises(InputError, match="load\\(\\) takes an artifact folder path") as info:
        enginekit.load(path)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("digest", [5, b"sha256:00", ["x"]])
def test_load_refuses_a_digest_that_is_not_a_string(clf: Path, digest: object) -> None:
    with pytest.raises(InputError, match="digest must be"):
        enginekit.load(clf, digest=digest)  # type: ignore[arg-type]


def test_a_closed_pil_image_is_one_line(clf: Path) -> None:
    image = make_photo((40, 40), 0)
    image.close()
    with enginekit.load(clf, device="cpu") as model:
        with pytest.raises(ImageError, match="cannot be read") as info:
            model.predict(image)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_or_device_is_refused_without_blocking(clf: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        with enginekit.load(clf, device="cpu") as model:
            for item in (fifo, "/dev/zero", "/dev/null"):
                try:
                    model.predict(item)
                except EngineKitError as exc:
                    outcome.append(exc)
                else:
                    outcome.append(None)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():
        with open(fifo, "wb"):  # unblock the reader so the thread can end
            pass
        pytest.fail("predict() blocked on a FIFO")
    assert len(outcome) == 3 and all(isinstance(e, ImageError) for e in outcome), outcome
    assert "FIFO" in str(outcome[0]) and "device" in str(outcome[1])


def test_a_lone_surrogate_prompt_is_one_line(tiny_sd: Path) -> None:
    with enginekit.load(tiny_sd, device="cpu") as pipe:
        with pytest.raises(InputError, match="not valid Unicode") as info:
            pipe("a cat \ud800", num_inference_steps=1, height=32, width=32)
        assert "\n" not in str(info.value)
        with pytest.raises(InputError, match="not valid Unicode"):
            pipe("a cat", negative_prompt="\udfff", num_inference_steps=1, height=32, width=32)


def test_a_deeply_nested_manifest_is_one_line(clf: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from enginekit.app.cli import cli

    for body in (DEEP, json.dumps({**json.loads((clf / "manifest.json").read_text()),
                                   "extra": json.loads("[" * 500 + "]" * 500)})):
        art = tmp_path / "deep"
        shutil.rmtree(art, ignore_errors=True)
        shutil.copytree(clf, art)
        (art / "manifest.json").write_text(body)
        with pytest.raises(ManifestError, match="nested") as info:
            enginekit.load(art)
        assert "\n" not in str(info.value)
        photo = tmp_path / "p.png"
        make_photo((32, 32), 1).save(photo)
        result = CliRunner().invoke(cli, ["predict", str(art), str(photo)])
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert result.output.strip().splitlines()[-1].startswith("Error: ") and "nested" in result.output


# ---------------------------------------------------------------------------- the server

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")


@pytest.fixture(scope="module")
def server(clf: Path, tiny_sd: Path):
    from enginekit.serve.app import create_app
    from enginekit.serve.settings import ServeSettings
    from enginekit.serve.testing import AppRunner

    settings = ServeSettings(max_batch=1, max_delay_ms=0, api_keys=frozenset({KEY}), max_body_bytes=2_000_000,
                             warmup=False)
    with AppRunner(create_app({"clf": clf, "sd": tiny_sd}, settings)) as runner:
        yield runner


AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.mark.parametrize("url", ["/v1/classify", "/v1/generate", "/v2/models/clf/infer", "/v2/models/sd/infer",
                                 "/sdapi/v1/txt2img"])
def test_a_deeply_nested_body_is_a_4xx(server, url: str) -> None:  # noqa: ANN001
    r = server.post(url, content=DEEP.encode(), headers=AUTH)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["error"]
    if not url.startswith("/sdapi"):  # FastAPI's own body parser answers A1111's: 400, its own words
        assert "nested" in r.json()["error"]
    assert server.get("/v2/health/ready").status_code == 200


def test_a_client_that_leaves_mid_body_is_not_a_server_error(server, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": b'{"images": ["', "more_body": True},
                {"type": "http.disconnect"}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/classify", "raw_path": b"/v1/classify", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", b"1000"), (b"authorization", f"Bearer {KEY}".encode())]}
    with caplog.at_level(logging.ERROR):
        server.call(server.app(scope, receive, send))
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
    starts = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert starts and starts[0] != 500
    metrics = server.get("/metrics", headers=AUTH).text
    lines = [ln for ln in metrics.splitlines() if ln.startswith("enginekit_requests_total") and "/v1/classify" in ln]
    assert lines and not any('code="500"' in ln for ln in lines), lines


@pytest.mark.parametrize("error", [ImageError("init image: 9000x9000 is over the limit of pixels"),
                                   ImageError("not an image"),
                                   __import__("enginekit.errors", fromlist=["BackendError"]).BackendError("bad size")])
def test_the_sse_error_status_is_what_a_plain_request_gets(server, monkeypatch: pytest.MonkeyPatch,
                                                           error: Exception) -> None:  # noqa: ANN001
    from enginekit.runtimes.tasks.text_to_image import TextToImage

    def refuse(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise error

    monkeypatch.setattr(TextToImage, "__call__", refuse)
    body = {"prompt": "a cat", "steps": 1, "model": "sd"}
    plain = server.post("/v1/generate", json={**body, "response_format": "json"}, headers=AUTH)
    assert 400 <= plain.status_code < 500, plain.text
    stream = server.post("/v1/generate", json={**body, "response_format": "sse"}, headers=AUTH)
    events = [block for block in stream.text.split("\n\n") if block.startswith("event: error")]
    assert events, stream.text
    data = json.loads(events[0].split("data: ", 1)[1])
    assert data["status"] == plain.status_code, (data, plain.status_code)
