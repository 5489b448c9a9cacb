"""`enginekit serve` as a real process on 127.0.0.1: end to end, a bounded load test
with overload, and the graceful drain on SIGTERM. Every process is terminated."""

from __future__ import annotations

import base64
import contextlib
import io
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="serving needs the 'serve' extra")
import httpx
from click.testing import CliRunner

import enginekit
from enginekit.app.cli import cli
from enginekit.serve.testing import free_port

from .test_serve import png

START_TIMEOUT_S = 90


@contextlib.contextmanager
def serving(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    cmd = [sys.executable, "-c", "from enginekit.app.cli import main; main()", "serve", *args,
           "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server not ready in time")
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_cli_refuses_bad_options_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "a=x", "a=y"])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith("Error: two models")
    empty = tmp_path / "keys.txt"
    empty.write_text("# none\n")
    result = runner.invoke(cli, ["serve", "x", "--api-key-file", str(empty)])
    assert result.exit_code == 1 and "holds no key" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["serve", "x", "--max-batch", "0"])
    assert result.exit_code == 1 and "max-batch" in result.output


def test_serve_end_to_end_with_an_api_key(exported: dict, tiny_pipelines: dict, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("k-123\n")
    reference = enginekit.load(exported["timm"], device="cpu")
    image = png(30)
    auth = {"Authorization": "Bearer k-123"}
    with serving(str(exported["timm"]), f"sd={tiny_pipelines[('tiny-sd15', 'onnx')]}",
                 "--api-key-file", str(keys)) as (proc, url):
        names = [m["name"] for m in httpx.get(f"{url}/v2/models", headers=auth).json()["models"]]
        assert names == ["timm", "sd"]  # a bare path is served under its folder's name
        assert httpx.get(f"{url}/v2/models").status_code == 401
        r = httpx.post(f"{url}/v1/classify", files={"images": ("x.png", image, "image/png")}, headers=auth)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == reference.predict([image])[0].label
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "a kite", "steps": 2, "seed": 1}, headers=auth,
                       timeout=30)
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_bounded_load_overload_answers_503_and_the_rest_correctly(exported: dict) -> None:
    reference = enginekit.load(exported["timm"], device="cpu")
    images = [png(40 + i) for i in range(8)]
    want = [p.label for p in reference.predict(images)]
    clients, per_client = 8, 12
    with serving(f"clf={exported['timm']}", "--max-batch", "2", "--max-delay-ms", "2", "--max-queue", "1") as (proc, url):
        def client(c: int) -> list[tuple[int, int, str | None, str | None]]:
            out = []
            with httpx.Client(base_url=url, timeout=30) as http:
                for i in range(per_client):
                    k = (c + i) % len(images)
                    r = http.post("/v1/classify", json={"images": [base64.b64encode(images[k]).decode()]})
                    label = r.json()["predictions"][0]["label"] if r.status_code == 200 else None
                    out.append((k, r.status_code, label, r.headers.get("retry-after")))
            return out

        with ThreadPoolExecutor(clients) as pool:
            results = [row for rows in pool.map(client, range(clients)) for row in rows]
        assert len(results) == clients * per_client
        codes = [code for _, code, _, _ in results]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) > 0 and codes.count(200) > 0, codes
        for k, code, label, retry in results:
            if code == 200:
                assert label == want[k]
            else:
                assert retry is not None and int(retry) >= 1
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200  # still healthy after


def test_sigterm_drains_requests_in_flight(tiny_pipelines: dict) -> None:
    path = tiny_pipelines[("tiny-sd15", "onnx")]
    with serving(f"sd={path}", "--max-queue", "8", "--timeout-s", "90") as (proc, url):
        # Requests long enough to be in flight when the signal lands: many steps at a larger size.
        body = {"prompt": "drain", "steps": 40, "seed": 5, "height": 128, "width": 128}
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def one() -> None:
            r = httpx.post(f"{url}/v1/generate", json=body, timeout=120)
            with lock:
                answers.append(r)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["job_count"] < 3:
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = None
        with contextlib.suppress(httpx.TransportError):
            late = httpx.post(f"{url}/v1/generate", json={"prompt": "late", "steps": 1}, timeout=10)
        if late is not None:  # refused while draining (or the port already closed: refused either way)
            assert late.status_code == 503 and late.headers["retry-after"]
        for t in threads:
            t.join(120)
        assert [r.status_code for r in answers] == [200, 200, 200]
        assert all(r.content[:4] == b"\x89PNG" for r in answers)
        assert proc.wait(30) == 0
