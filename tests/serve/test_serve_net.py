"""enginekit serve on a real uvicorn (127.0.0.1, an ephemeral port): tritonclient.http
unchanged against the KServe v2 endpoints, and cancellation when a client disconnects."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")
httpclient = pytest.importorskip("tritonclient.http", reason="the test client is tritonclient[http]")
import httpx
from tritonclient.utils import InferenceServerException

import enginekit
from enginekit.serve.app import create_app
from enginekit.serve.settings import ServeSettings
from enginekit.serve.testing import UvicornThread

from ..conftest import TIMM_LABELS
from .test_serve import _metric, png


@pytest.fixture(scope="module")
def live(exported: dict, tiny_pipelines: dict):
    app = create_app({"clf": exported["timm"], "sd": tiny_pipelines[("tiny-sd15", "onnx")]},
                     ServeSettings(max_batch=4, max_delay_ms=2))
    with UvicornThread(app) as server:
        yield server


def test_tritonclient_works_unchanged(live: UvicornThread, exported: dict) -> None:
    reference = enginekit.load(exported["timm"], device="cpu")
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{live.port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("clf")
        meta = client.get_model_metadata("clf")
        h, w = reference.preprocessing.size
        assert meta["inputs"][0]["shape"] == [-1, 3, h, w]
        assert client.get_model_config("clf")["max_batch_size"] == 4
        pixels = np.random.default_rng(1).standard_normal((2, 3, h, w)).astype(np.float32)
        want = reference.run_pixels(pixels)
        for binary in (True, False):
            inp = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
            inp.set_data_from_numpy(pixels, binary_data=binary)
            outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary),
                       httpclient.InferRequestedOutput("embedding", binary_data=binary)]
            result = client.infer("clf", [inp], outputs=outputs, request_id="abc")
            np.testing.assert_allclose(result.as_numpy("logits"), want["logits"], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(result.as_numpy("embedding"), want["embedding"], rtol=1e-4, atol=1e-5)
            assert result.get_response()["id"] == "abc"
        # No outputs named: all of them, in binary (tritonclient's default).
        inp = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        assert client.infer("clf", [inp]).as_numpy("logits").shape == want["logits"].shape
        # Encoded images as BYTES, and Triton's classification extension.
        images = [png(3), png(4)]
        inp = httpclient.InferInput("image", [2], "BYTES")
        inp.set_data_from_numpy(np.array(images, dtype=np.object_))
        top = client.infer("clf", [inp], outputs=[httpclient.InferRequestedOutput("logits", class_count=1)])
        labels = [row[0].decode().split(":")[2] for row in top.as_numpy("logits")]
        assert labels == [p.label for p in reference.predict(images)] and set(labels) <= set(TIMM_LABELS)
        # Explanations through a request parameter (docs/explain.md's example).
        explained = client.infer("clf", [inp], parameters={"explain": "rollout"})
        np.testing.assert_allclose(explained.as_numpy("explanation"),
                                   np.stack([e.grid for e in reference.explain(images)]), atol=1e-6)
        assert explained.as_numpy("explanation_png").shape == (2,)
        with pytest.raises(InferenceServerException, match="takes one input"):
            bad = httpclient.InferInput("nope", [1], "FP32")
            bad.set_data_from_numpy(np.zeros(1, np.float32))
            client.infer("clf", [bad])
        with pytest.raises(InferenceServerException, match="no model named"):
            client.get_model_metadata("missing")
    finally:
        client.close()


def test_tritonclient_reads_statistics_and_the_repository_index(live: UvicornThread) -> None:
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{live.port}")
    try:
        before = client.get_inference_statistics("clf")["model_stats"][0]
        pixels = np.zeros((3, 3, 32, 32), np.float32)
        inp = httpclient.InferInput("pixel_values", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels)
        client.infer("clf", [inp])
        after = client.get_inference_statistics("clf")["model_stats"][0]
        assert after["name"] == "clf" and after["version"] == "1"
        assert after["inference_count"] == before["inference_count"] + 3
        assert after["execution_count"] == before["execution_count"] + 1
        success = after["inference_stats"]["success"]
        assert success["count"] == before["inference_stats"]["success"]["count"] + 1 and success["ns"] > 0
        assert any(b["batch_size"] == 3 for b in after["batch_stats"])
        every = client.get_inference_statistics()["model_stats"]
        assert {m["name"] for m in every} == {"clf", "sd"}
        assert client.get_inference_statistics("clf", "1")["model_stats"][0]["name"] == "clf"
        with pytest.raises(InferenceServerException, match="no model named"):
            client.get_inference_statistics("missing")
        index = client.get_model_repository_index()
        assert sorted((m["name"], m["state"]) for m in index) == [("clf", "READY"), ("sd", "READY")]
    finally:
        client.close()


def _slow_steps(server: UvicornThread, name: str, seconds: float) -> list[int]:
    jobs = server.server.config.app.state.server.slots[name].jobs
    seen: list[int] = []
    original = jobs.progress

    def progress(job, step, steps):
        seen.append(step)
        time.sleep(seconds)
        original(job, step, steps)

    jobs.progress = progress
    return seen


def _wait_idle(server: UvicornThread, name: str, timeout: float = 5.0) -> bool:
    jobs = server.server.config.app.state.server.slots[name].jobs
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if jobs.current is None:
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_disconnects_cancels_its_generation(live: UvicornThread) -> None:
    seen = _slow_steps(live, "sd", 0.05)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}/v1/generate", json={"prompt": "gone", "steps": 100}, timeout=0.5)
        assert _wait_idle(live, "sd") and len(seen) < 100
        # The same through the event stream: read the first progress event, then hang up.
        seen.clear()
        with httpx.stream("POST", f"{live.url}/v1/generate", timeout=10,
                          json={"prompt": "gone", "steps": 100, "response_format": "sse"}) as r:
            for line in r.iter_lines():
                if line.startswith("event: progress"):
                    break
        assert _wait_idle(live, "sd") and len(seen) < 100
        r = httpx.get(f"{live.url}/metrics")
        assert _metric(r.text, 'enginekit_rejections_total{model="sd",reason="client_gone"}') == 2
    finally:
        jobs = live.server.config.app.state.server.slots["sd"].jobs
        jobs.__dict__.pop("progress", None)


def test_interrupt_stops_the_running_generation(live: UvicornThread) -> None:
    seen = _slow_steps(live, "sd", 0.05)
    try:
        import threading

        answer: dict = {}
        t = threading.Thread(target=lambda: answer.setdefault("r", httpx.post(
            f"{live.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 100}, timeout=30)))
        t.start()
        while not seen:
            time.sleep(0.02)
        assert httpx.post(f"{live.url}/sdapi/v1/interrupt").json() == {"interrupted": ["sd"]}
        t.join(10)
        r = answer["r"]
        assert r.status_code == 400 and "cancelled" in r.json()["error"] and len(seen) < 100
        assert json.loads(r.text)["error"]
    finally:
        jobs = live.server.config.app.state.server.slots["sd"].jobs
        jobs.__dict__.pop("progress", None)
