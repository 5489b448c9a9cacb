"""Throughput mode: several requests in flight, frames per second as benchmark_app reports them.

``enginekit bench ART --mode throughput [--requests N]`` keeps ``N`` inferences in
flight for the timed window and reports the frames finished per second of wall
time (``throughput_ips``), with each request's own latency percentiles beside it:

- OpenVINO: ``N`` infer requests of the compiled model, each driven by a thread of its own (the
  engine is loaded with the THROUGHPUT performance hint, benchmark_app's default, so the plugin
  runs several streams); ``N`` defaults to the plugin's ``OPTIMAL_NUMBER_OF_INFER_REQUESTS``. Not
  ``AsyncInferQueue``: its Python callback runs on OpenVINO's stream threads, which then need the
  GIL, and closing the engine right after (which joins those threads while holding the GIL) hung;
- ONNX Runtime (and any other runner): ``N`` threads calling the same session,
  whose ``run`` is thread-safe; ``N`` defaults to the physical cores.

A fixed ``runs`` count is the number of requests finished in the timed window; a
``duration_s`` window submits requests until it closes. Warm-up submits
``warmup`` requests first, untimed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from enginekit.bench.harness import BenchConfig, latency_stats, make_feeds
from enginekit.runtimes.base import Runner

__all__ = ["bench_throughput", "default_requests"]


def default_requests(runner: Runner) -> int:
    """benchmark_app's choice: OpenVINO's optimal number of infer requests; else one per physical core."""
    compiled = getattr(runner, "_compiled", None)  # OpenVINO runners keep their compiled model here
    if compiled is not None:
        try:
            return max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        except Exception:  # noqa: BLE001 - a plugin that does not report it: fall back to the cores
            pass
    return max(1, psutil.cpu_count(logical=False) or 1)


def bench_throughput(runner: Runner, batch: int, config: BenchConfig, requests: int = 0,
                     on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Time ``runner`` with ``requests`` inferences in flight (0: :func:`default_requests`).

    Returns a :func:`~enginekit.bench.harness.bench_runner`-shaped result whose
    ``throughput_ips`` is frames finished / wall seconds, plus ``requests`` (in
    flight) and ``how`` (the mechanism: ``openvino infer requests`` or ``threads``).
    """
    if requests < 0:
        raise ValueError(f"requests in flight must be at least 1 (0: the backend's choice), got {requests}")
    n = requests or default_requests(runner)
    feeds = make_feeds(runner.inputs, batch, config.seed)
    compiled = getattr(runner, "_compiled", None)
    if compiled is not None:
        samples, wall = _openvino_requests(compiled, feeds, n, config, on_progress)
        how = "openvino infer requests"
    else:
        samples, wall = _threads(runner, feeds, n, config, on_progress)
        how = "threads"
    stats = latency_stats(samples)
    return {"batch": int(batch), "latency_ms": stats, "throughput_ips": batch * len(samples) / wall,
            "runs": len(samples), "requests": n, "how": how}


def _window(config: BenchConfig) -> Callable[[int], bool]:
    """Whether another request should be submitted after ``submitted`` timed ones."""
    if config.duration_s is None:
        return lambda submitted: submitted < (config.runs or 0)
    deadline = time.perf_counter() + config.duration_s
    return lambda submitted: submitted == 0 or time.perf_counter() < deadline


def _openvino_requests(compiled: Any, feeds: dict[str, Any], n: int, config: BenchConfig,
                       on_progress: Callable[[int], None] | None) -> tuple[list[float], float]:
    """``n`` infer requests, one per thread (``infer`` lets go of the GIL while it runs)."""
    requests = [compiled.create_infer_request() for _ in range(n)]
    for i in range(config.warmup):
        requests[i % n].infer(feeds)
    return _workers([r.infer for r in requests], feeds, config, on_progress)


def _threads(runner: Runner, feeds: dict[str, Any], n: int, config: BenchConfig,
             on_progress: Callable[[int], None] | None) -> tuple[list[float], float]:
    for _ in range(config.warmup):
        runner.run(feeds)
    return _workers([runner.run] * n, feeds, config, on_progress)


def _workers(calls: list[Callable[[dict[str, Any]], Any]], feeds: dict[str, Any], config: BenchConfig,
             on_progress: Callable[[int], None] | None) -> tuple[list[float], float]:
    """One thread per call, each submitting until the window closes: the samples and the wall time."""
    lock = threading.Lock()
    samples: list[float] = []
    errors: list[BaseException] = []
    more = _window(config)
    submitted = [0]

    def worker(call: Callable[[dict[str, Any]], Any]) -> None:
        while True:
            with lock:
                if errors or not more(submitted[0]):
                    return
                submitted[0] += 1
            started = time.perf_counter()
            try:
                call(feeds)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                with lock:
                    errors.append(exc)
                return
            with lock:
                samples.append(time.perf_counter() - started)
                if on_progress is not None:
                    on_progress(len(samples))

    workers = [threading.Thread(target=worker, args=(call,), name=f"enginekit-bench-{i}", daemon=True)
               for i, call in enumerate(calls)]
    start = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return samples, wall
