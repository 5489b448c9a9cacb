"""The server when things go wrong: a failed request never affects the next one (on
/v1/generate, KServe infer and the A1111 API), a model whose engine broke is reported not
ready, a timed-out or cancelled generation stops and leaves the queue count right, the
pixel cap answers before anything is queued, and omitted settings are the model's own.

The failing request is made to fail inside the engine by corrupting the denoiser's feed
(the pipeline's ``recorder`` hook), so it fails whatever sizes the exported graphs take."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")
pytest.importorskip("prometheus_client", reason="serving needs the 'serve' extra")

import enginekit  # noqa: E402
from enginekit.serve.app import create_app  # noqa: E402
from enginekit.serve.settings import ServeSettings  # noqa: E402
from enginekit.serve.testing import AppRunner  # noqa: E402


@pytest.fixture(scope="module")
def sd_path(tiny_pipelines: dict) -> Path:
    return tiny_pipelines[("tiny-sd15", "onnx")]


class Fault:
    """Corrupts the UNet's next feed once when armed (a batch that does not match the latents)."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self, component: str, feeds: dict) -> None:
        if self.armed and component == "unet":
            self.armed = False
            feeds["encoder_hidden_states"] = np.concatenate([feeds["encoder_hidden_states"]] * 2)[:3]


def _error(response, status: int, needle: str = "") -> str:
    assert response.status_code == status, (response.status_code, response.text)
    message = response.json()["error"]
    assert needle.lower() in message.lower() and "\n" not in message and "/tmp" not in message, message
    return message


def _png(response) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(response.content)))


def _b64_image(text: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def _kserve(prompt: str, **params) -> dict:
    return {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [prompt]}],
            "parameters": {"steps": 2, "seed": 5, "guidance": 5.0, **params}}


def _metric(text: str, key: str) -> float:
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{key} not in the metrics")


def test_good_bad_good_on_every_api(sd_path: Path) -> None:
    with AppRunner(create_app({"sd": sd_path}, ServeSettings(warmup=False))) as runner:
        fault = Fault()
        runner.state.slots["sd"].obj.recorder = fault

        def three(send, read):
            first = send()
            assert first.status_code == 200, first.text
            fault.armed = True
            bad = send()
            assert not fault.armed
            third = send()
            assert third.status_code == 200, third.text
            np.testing.assert_array_equal(read(third), read(first))
            return bad

        body = {"prompt": "a boat", "steps": 2, "seed": 5, "guidance": 5.0}
        bad = three(lambda: runner.post("/v1/generate", json=body), _png)
        _error(bad, 422, "unet' failed")
        bad = three(lambda: runner.post("/v2/models/sd/infer", json=_kserve("a boat")),
                    lambda r: np.asarray(r.json()["outputs"][0]["data"]))
        _error(bad, 422, "unet' failed")
        a1111 = {"prompt": "a boat", "steps": 2, "seed": 5, "cfg_scale": 5.0}
        bad = three(lambda: runner.post("/sdapi/v1/txt2img", json=a1111), lambda r: _b64_image(r.json()["images"][0]))
        _error(bad, 422, "unet' failed")
        fault.armed = True
        r = runner.post("/v1/generate", json={**body, "response_format": "sse"})
        error = [json.loads(b.split("\n")[1][6:]) for b in r.text.strip().split("\n\n") if b.startswith("event: error")]
        assert error and error[0]["status"] == 422 and "unet' failed" in error[0]["error"], r.text
        assert runner.get("/v2/models/sd/ready").status_code == 200
        assert runner.get("/v2/health/ready").status_code == 200


def test_a_model_whose_engine_broke_is_not_ready_and_says_why(sd_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with AppRunner(create_app({"sd": sd_path}, ServeSettings(warmup=False))) as runner:
        slot = runner.state.slots["sd"]
        fault = Fault()
        slot.obj.recorder = fault
        assert runner.post("/v1/generate", json={"prompt": "x", "steps": 1, "seed": 1}).status_code == 200

        def cannot() -> None:
            raise RuntimeError("device lost")

        monkeypatch.setattr(slot.obj.components["unet"], "_recover", cannot)
        fault.armed = True
        _error(runner.post("/v1/generate", json={"prompt": "x", "steps": 1, "seed": 1}), 503, "out of service")
        r = runner.get("/v2/models/sd/ready")
        assert r.status_code == 503 and r.json()["state"] == "broken", r.text
        assert "unet" in r.json()["reason"] and "device lost" in r.json()["reason"]
        health = runner.get("/v2/health/ready")
        assert health.status_code == 503 and "device lost" in health.json()["models"]["sd"]["reason"]
        _error(runner.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}), 503, "not ready")
        assert _metric(runner.get("/metrics").text, 'enginekit_model_ready{model="sd"}') == 0


def _slow_steps(runner: AppRunner, seconds: float) -> list[int]:
    jobs = runner.state.slots["sd"].jobs
    original = jobs.progress
    seen: list[int] = []

    def progress(job, step, steps):
        seen.append(step)
        time.sleep(seconds)
        original(job, step, steps)

    jobs.progress = progress
    return seen


def _timeout(runner: AppRunner, seconds: float) -> None:
    """Set ``--timeout-s`` of a running server (short for the request that must time out,
    long for the ones that must not, whatever the load on this machine)."""
    runner.state.settings = dataclasses.replace(runner.state.settings, timeout_s=seconds)


def test_a_timeout_stops_the_generation_and_the_queue_count_drops(sd_path: Path) -> None:
    with AppRunner(create_app({"sd": sd_path}, ServeSettings(timeout_s=120, warmup=False))) as runner:
        slot = runner.state.slots["sd"]
        assert runner.post("/v1/generate", json={"prompt": "x", "steps": 1, "seed": 1}).status_code == 200
        seen = _slow_steps(runner, 0.1)
        _timeout(runner, 0.5)

        async def two(client):  # the second waits behind the first; both time out
            return await asyncio.gather(client.post("/v1/generate", json={"prompt": "slow", "steps": 100, "seed": 1}),
                                        client.post("/sdapi/v1/txt2img", json={"prompt": "next", "steps": 100}))

        for r in runner.run(two):
            _error(r, 504, "cancelled")
        assert slot.depth == 0  # the one that timed out while waiting no longer counts
        assert _metric(runner.get("/metrics").text, 'enginekit_queue_depth{model="sd"}') == 0
        deadline = time.monotonic() + 30
        while slot.jobs.current is not None and time.monotonic() < deadline:  # stops within a step
            time.sleep(0.02)
        assert slot.jobs.current is None and len(seen) < 100
        _timeout(runner, 120)
        seen.clear()
        r = runner.post("/v1/generate", json={"prompt": "now", "steps": 2, "seed": 1})
        assert r.status_code == 200 and seen == [1, 2], r.text  # the 100-step job stopped: this one ran


def test_a_timeout_interrupts_the_engine_call_in_flight(sd_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that takes longer than the timeout (a huge image) is stopped inside the engine."""
    with AppRunner(create_app({"sd": sd_path}, ServeSettings(timeout_s=120, warmup=False))) as runner:
        slot = runner.state.slots["sd"]
        assert runner.post("/v1/generate", json={"prompt": "x", "steps": 1, "seed": 1}).status_code == 200
        unet = slot.obj.components["unet"]
        _timeout(runner, 0.5)
        stopped, real_run = threading.Event(), unet._run

        def endless(feeds):  # an engine call that only ends when interrupted
            if not stopped.wait(60):
                raise AssertionError("never interrupted")
            raise RuntimeError("terminated")

        monkeypatch.setattr(unet, "_run", endless)
        monkeypatch.setattr(unet, "_interrupt", lambda: stopped.set() or True)
        _error(runner.post("/v1/generate", json={"prompt": "huge", "steps": 3, "seed": 1}), 504, "cancelled")
        deadline = time.monotonic() + 30
        while slot.jobs.current is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stopped.is_set() and slot.jobs.current is None and slot.ready and unet.broken is None
        monkeypatch.setattr(unet, "_run", real_run)
        _timeout(runner, 120)
        assert runner.post("/v1/generate", json={"prompt": "x", "steps": 1, "seed": 1}).status_code == 200


def test_the_pixel_cap_answers_413_on_every_api_before_queueing(sd_path: Path) -> None:
    with AppRunner(create_app({"sd": sd_path}, ServeSettings(warmup=False))) as runner:
        slot = runner.state.slots["sd"]
        limit = slot.obj.config.default_size ** 2 * 4  # the model's own size x 4
        assert runner.get("/v2/models").json()["models"][0]["max_pixels"] == limit
        big = {"height": 128, "width": 136}  # 17,408 pixels > 64 x 64 x 4
        seen = _slow_steps(runner, 0.0)
        _error(runner.post("/v1/generate", json={"prompt": "x", **big}), 413, "--max-pixels")
        _error(runner.post("/v1/generate", json={"prompt": "x", "num_images": 5, "response_format": "json"}), 413,
               "5 image(s)")
        _error(runner.post("/sdapi/v1/txt2img", json={"prompt": "x", **big}), 413, "--max-pixels")
        _error(runner.post("/v2/models/sd/infer", json=_kserve("x", **big)), 413, "--max-pixels")
        assert seen == [] and slot.jobs.current is None
        assert _metric(runner.get("/metrics").text, 'enginekit_rejections_total{model="sd",reason="too_large"}') == 4
    with AppRunner(create_app({"sd": sd_path}, ServeSettings(warmup=False, max_pixels=64 * 64))) as runner:
        _error(runner.post("/v1/generate", json={"prompt": "x", "height": 64, "width": 72}), 413, "4096")
        assert runner.post("/v1/generate", json={"prompt": "x", "steps": 1, "seed": 1}).status_code == 200


def test_omitted_settings_are_the_models_own(tiny_pipelines: dict) -> None:
    """FLUX.1-dev's export records 28 steps and guidance 3.5; the server's own were 20 and 7.5."""
    path = tiny_pipelines[("tiny-flux", "onnx")]
    pipe = enginekit.load(path, device="cpu")
    steps, guidance = pipe.config.default_steps, pipe.config.default_guidance_scale
    assert (steps, guidance) == (28, 3.5)
    with AppRunner(create_app({"flux": path}, ServeSettings(warmup=False))) as runner:
        r = runner.post("/v1/generate", json={"prompt": "a fox", "seed": 9, "response_format": "sse"})
        events = [(b.split("\n")[0][7:], json.loads(b.split("\n")[1][6:])) for b in r.text.strip().split("\n\n")]
        assert [d["step"] for k, d in events if k == "progress"] == list(range(1, steps + 1))
        assert events[-1][0] == "done", events[-1]
        got = _b64_image(events[-1][1]["images"][0])
    want = np.asarray(pipe("a fox", num_inference_steps=steps, guidance_scale=guidance, seed=9).images[0])
    np.testing.assert_array_equal(got, want)


def test_sizes_the_engine_cannot_take_are_refused_before_queueing(tiny_pipelines: dict) -> None:
    """SD3 takes multiples of 16: 72 passes the server's general multiple-of-8 check, and the
    engine's own rule (the one the library applies) answers 422 before anything is queued."""
    with AppRunner(create_app({"sd3": tiny_pipelines[("tiny-sd3", "onnx")]}, ServeSettings(warmup=False))) as runner:
        slot = runner.state.slots["sd3"]
        seen: list[int] = []
        original = slot.jobs.progress
        slot.jobs.progress = lambda job, step, steps: (seen.append(step), original(job, step, steps))
        message = _error(runner.post("/v1/generate", json={"prompt": "x", "width": 72, "steps": 1}), 422,
                         "multiple of 16")
        assert "width" in message
        _error(runner.post("/sdapi/v1/txt2img", json={"prompt": "x", "height": 72, "steps": 1}), 422, "multiple of 16")
        assert seen == [] and slot.jobs.current is None
        assert runner.post("/v1/generate", json={"prompt": "x", "width": 80, "height": 48, "steps": 1,
                                                 "seed": 1}).status_code == 200
