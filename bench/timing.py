"""The bench's timer: seeded feeds, warm-up then a fixed count or a fixed time, and the statistics."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from enginekit.errors import ShapeError
from enginekit.manifest import TensorSpec
from enginekit.runtimes.base import Runner

__all__ = ["BenchConfig", "bench_runner", "latency_stats", "load_average", "make_feeds", "spread", "time_callable"]


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15-minute load averages (None where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def spread(stats: Mapping[str, float]) -> float | None:
    """p99 / p50 of a :func:`latency_stats` result: 1.0 is a steady run, 2 and more a noisy one."""
    p50, p99 = stats.get("p50"), stats.get("p99")
    return float(p99 / p50) if p50 and p99 is not None and p50 > 0 else None


@dataclass(frozen=True)
class BenchConfig:
    """What to time: a fixed number of runs OR a fixed duration, after ``warmup`` calls.

    ``threads`` 0 leaves the backend's default; ``seed`` seeds the random feeds.
    """

    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 10
    runs: int | None = 50
    duration_s: float | None = None
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.runs is None) == (self.duration_s is None):
            raise ValueError(
                "BenchConfig needs exactly one of runs (a fixed count) or duration_s (a fixed time); "
                f"got runs={self.runs!r}, duration_s={self.duration_s!r}; pass runs=None with duration_s"
            )
        if self.runs is not None and self.runs < 1:
            raise ValueError(f"BenchConfig.runs must be at least 1, got {self.runs}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"BenchConfig.duration_s must be positive, got {self.duration_s}")
        if self.warmup < 0 or self.threads < 0:
            raise ValueError(f"BenchConfig.warmup and threads must be at least 0, got {self.warmup}, {self.threads}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"BenchConfig.batch_sizes must be positive integers, got {self.batch_sizes!r}")


def latency_stats(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min/max in milliseconds (linear percentiles) and ``count`` of ``samples_s`` (seconds)."""
    if len(samples_s) == 0:
        raise ValueError("latency_stats needs at least one sample")
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99], method="linear"))
    return {"p50": p50, "p90": p90, "p99": p99, "mean": float(ms.mean()), "min": float(ms.min()),
            "max": float(ms.max()), "count": int(ms.size)}


def time_callable(fn: Callable[[], Any], config: BenchConfig,
                  on_progress: Callable[[int], None] | None = None) -> list[float]:
    """Call ``fn`` ``config.warmup`` times untimed, then time it (seconds, ``perf_counter``)
    ``config.runs`` times or until ``config.duration_s`` has passed (at least once).

    ``on_progress(i)`` is called after the i-th timed run (1-based), outside the timed window.
    """
    for _ in range(config.warmup):
        fn()
    samples: list[float] = []
    deadline = None if config.duration_s is None else time.perf_counter() + config.duration_s
    while True:
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        samples.append(end - start)
        if on_progress is not None:
            on_progress(len(samples))
        if deadline is None:
            if len(samples) >= (config.runs or 0):
                return samples
        elif end >= deadline:
            return samples


def _concrete_shape(spec: TensorSpec, batch: int) -> tuple[int, ...]:
    shape = []
    for axis, dim in enumerate(spec.shape):
        symbolic = not isinstance(dim, int) or dim < 0
        if axis == 0:
            if not symbolic and dim != batch:
                raise ShapeError(f"input {spec.name!r} has a fixed batch of {dim}; it cannot be benched at batch {batch}")
            shape.append(batch)
        elif symbolic:
            raise ShapeError(
                f"input {spec.name!r} has a symbolic dimension {dim!r} on axis {axis} (shape {tuple(spec.shape)}); "
                "the bench only fills a symbolic batch axis: export with a fixed size"
            )
        else:
            shape.append(dim)
    return tuple(shape)


def make_feeds(inputs: Sequence[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded feeds for ``inputs``: standard normal for float inputs, 0/1 for integer and bool ones."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = _concrete_shape(spec, batch)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def bench_runner(runner: Runner, batch: int, config: BenchConfig,
                 on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Time ``runner.run`` on a seeded feed at ``batch``: warm latency and throughput (images/s at p50)."""
    feeds = make_feeds(runner.inputs, batch, config.seed)
    samples = time_callable(lambda: runner.run(feeds), config, on_progress)
    stats = latency_stats(samples)
    return {"batch": int(batch), "latency_ms": stats, "throughput_ips": batch * 1000.0 / stats["p50"],
            "runs": len(samples)}


def _progress_bar(desc: str, total: int | None, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", leave=False, disable=not enabled, file=sys.stderr)
