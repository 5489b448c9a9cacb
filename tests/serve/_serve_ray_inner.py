"""The Ray Serve tests proper. Not collected on their own (the name does not start with
``test_``): tests/serve/test_serve_ray.py runs this file in a fresh network namespace holding
only loopback, where Ray cannot bind another interface, and passes the artifacts in
``$ENGINEKIT_RAY_ARTIFACTS``. One cluster for the whole module: ``enginekit serve --ray
--replicas 2`` starts it; the last test stops it with Ctrl-C (SIGINT)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import pytest

import httpx
from PIL import Image

from enginekit.serve.app import create_app
from enginekit.serve.settings import ServeSettings
from enginekit.serve.testing import AppRunner, free_port

from .test_serve import png

REPLICAS = 2
START_TIMEOUT_S = 150
HEADER = "x-enginekit-replica"

if "ENGINEKIT_RAY_ARTIFACTS" not in os.environ:
    pytest.skip("run by tests/serve/test_serve_ray.py inside a loopback-only network namespace", allow_module_level=True)
MODELS = {k: Path(v) for k, v in json.loads(os.environ["ENGINEKIT_RAY_ARTIFACTS"]).items()}
SETTINGS = ServeSettings(max_batch=4, max_delay_ms=2, device="cpu")


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port = free_port()
    log = tmp_path_factory.mktemp("ray-serve") / "serve.log"
    cmd = [sys.executable, "-m", "enginekit.app.cli", "serve", *(f"{k}={v}" for k, v in MODELS.items()),
           "--ray", "--replicas", str(REPLICAS), "--port", str(port), "--device", "cpu",
           "--max-batch", str(SETTINGS.max_batch), "--max-delay-ms", str(SETTINGS.max_delay_ms),
           "--log-level", "warning"]
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "through Ray Serve" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"serve --ray exited with {proc.returncode}: {served.output()}"
            assert time.monotonic() < deadline, f"serve --ray not up in {START_TIMEOUT_S} s: {served.output()}"
            time.sleep(0.3)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def in_process() -> Iterator[AppRunner]:
    """The same app in this process: what Ray's answers must equal."""
    with AppRunner(create_app(MODELS, SETTINGS)) as runner:
        yield runner


def test_health_and_readiness(ray_server: Served) -> None:
    assert httpx.get(f"{ray_server.url}/v2/health/live", timeout=10).status_code == 200
    r = httpx.get(f"{ray_server.url}/v2/health/ready", timeout=10)
    assert r.status_code == 200 and r.json()["ready"] is True, r.text
    models = httpx.get(f"{ray_server.url}/v2/models", timeout=10).json()["models"]
    assert [(m["name"], m["state"]) for m in models] == [(name, "ready") for name in MODELS]


def test_two_replicas_run_and_each_loaded_the_models(ray_server: Served) -> None:
    import ray
    from ray import serve

    from enginekit.serve.ray import replica_states

    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    try:
        assert replica_states(serve) == {"RUNNING": REPLICAS}
    finally:
        ray.shutdown()  # this driver only: the cluster belongs to the serve process
    # Ray's proxy spreads requests: both replicas answer, each ready (its own models loaded).
    seen: dict[str, int] = {}
    for _ in range(40):
        r = httpx.get(f"{ray_server.url}/v2/health/ready", timeout=10)
        assert r.status_code == 200, r.text
        replica, pid = r.headers[HEADER].split(" pid=")
        seen[replica] = int(pid)
    assert len(seen) == REPLICAS, seen
    assert len(set(seen.values())) == REPLICAS  # two processes, not one answering twice


def test_kserve_infer_matches_the_in_process_app(ray_server: Served, in_process: AppRunner) -> None:
    pixels = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    body = {"id": "r1", "inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(pixels.shape),
                                    "data": pixels.ravel().tolist()}]}
    want = in_process.post("/v2/models/clf/infer", json=body)
    got = httpx.post(f"{ray_server.url}/v2/models/clf/infer", json=body, timeout=30)
    assert want.status_code == got.status_code == 200, got.text
    w, g = want.json(), got.json()
    assert g["id"] == "r1" and [o["name"] for o in g["outputs"]] == [o["name"] for o in w["outputs"]]
    for wo, go in zip(w["outputs"], g["outputs"]):
        assert go["shape"] == wo["shape"] and go["datatype"] == wo["datatype"]
        np.testing.assert_allclose(go["data"], wo["data"], rtol=1e-5, atol=1e-6)


def test_classify_matches_the_in_process_app(ray_server: Served, in_process: AppRunner) -> None:
    files = [("images", (f"{i}.png", png(70 + i), "image/png")) for i in range(3)]
    want = in_process.post("/v1/classify", files=files, data={"top_k": "2"})
    got = httpx.post(f"{ray_server.url}/v1/classify", files=files, data={"top_k": "2"}, timeout=30)
    assert want.status_code == got.status_code == 200, got.text
    w, g = want.json()["predictions"], got.json()["predictions"]
    assert [p["label"] for p in g] == [p["label"] for p in w]
    np.testing.assert_allclose([p["score"] for p in g], [p["score"] for p in w], rtol=1e-5)
    # The batched path too: several requests at once through the proxy, each its own answer.
    bodies = [{"images": [base64.b64encode(png(80 + i)).decode()]} for i in range(4)]
    with httpx.Client(timeout=30) as client:
        answers = [client.post(f"{ray_server.url}/v1/classify", json=b) for b in bodies]
    for b, r in zip(bodies, answers):
        assert r.status_code == 200
        assert r.json()["predictions"][0]["label"] == in_process.post("/v1/classify", json=b).json()["predictions"][0]["label"]


def test_generate_matches_the_in_process_app(ray_server: Served, in_process: AppRunner) -> None:
    body = {"prompt": "a kite", "steps": 2, "seed": 1}
    want = in_process.post("/v1/generate", json=body)
    got = httpx.post(f"{ray_server.url}/v1/generate", json=body, timeout=60)
    assert want.status_code == got.status_code == 200, got.text
    assert got.content[:8] == b"\x89PNG\r\n\x1a\n"
    a = np.asarray(Image.open(io.BytesIO(want.content)), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(got.content)), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_metrics_of_the_replica_that_answers(ray_server: Served) -> None:
    r = httpx.get(f"{ray_server.url}/metrics", timeout=10)
    assert r.status_code == 200 and 'enginekit_model_ready{model="clf"} 1.0' in r.text
    assert "enginekit_requests_total" in r.text


def _ray_processes() -> list[str]:
    names = []
    for p in psutil.process_iter(["name", "cmdline"]):
        text = " ".join(p.info["cmdline"] or [p.info["name"] or ""])
        if any(k in text for k in ("raylet", "gcs_server", "ServeReplica", "ServeController", "ProxyActor")):
            names.append(text[:80])
    return names


def test_ctrl_c_shuts_down_cleanly(ray_server: Served) -> None:
    assert _ray_processes(), "no Ray process to stop"
    ray_server.proc.send_signal(signal.SIGINT)
    assert ray_server.proc.wait(60) == 0, ray_server.output()
    assert "Traceback" not in ray_server.output(), ray_server.output()
    deadline = time.monotonic() + 20
    while (left := _ray_processes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{ray_server.url}/v2/health/live", timeout=5)
