"""`enginekit serve --workers 2`: two uvicorn worker processes on 127.0.0.1, each
loading the model itself, both answering, and all gone after SIGTERM."""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")
pytest.importorskip("uvicorn", reason="serving needs the 'serve' extra")
import httpx
import psutil

import enginekit

from .test_serve import png
from .test_serve_cli import serving

WORKERS = 2


def _has_engine(pid: int) -> bool:
    """The backend's native library is mapped: this process loaded an engine (backends load lazily)."""
    try:
        return any("onnxruntime_pybind11_state" in m.path for m in psutil.Process(pid).memory_maps())
    except psutil.Error:
        return False


def test_two_workers_each_load_the_model_answer_and_stop_on_sigterm(exported: dict) -> None:
    reference = enginekit.load(exported["timm"], device="cpu")
    images = [png(60 + i) for i in range(4)]
    want = [p.label for p in reference.predict(images)]
    with serving(f"clf={exported['timm']}", "--workers", str(WORKERS), "--device", "cpu") as (proc, url):
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while True:  # uvicorn's workers are spawned children (beside multiprocessing's resource tracker)
            workers = [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]
            if len(workers) == WORKERS and all(_has_engine(w.pid) for w in workers):
                break
            assert time.monotonic() < deadline, f"workers: {[w.cmdline() for w in workers]}"
            time.sleep(0.2)
        # Either worker may take a connection: ready means ready on both, many times over.
        streak, deadline = 0, time.monotonic() + 60
        while streak < 10:
            assert time.monotonic() < deadline, "the workers never both reported ready"
            streak = streak + 1 if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200 else 0
        for i in range(8):
            k = i % len(images)
            r = httpx.post(f"{url}/v1/classify", json={"images": [base64.b64encode(images[k]).decode()]}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["label"] == want[k]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers still running after SIGTERM: {[p.pid for p in alive]}"
