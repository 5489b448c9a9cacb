"""Per-model inference statistics in the shape of Triton's statistics extension
(``GET /v2/models/stats``), booked by the queues in front of each model.

Each request that reaches a model's queue is booked once, as a success or a failure (a
timeout, a cancellation, an engine error), with its time from arrival to answer; its wait
in the queue under ``queue``; each engine call under ``compute_infer`` (every request it
served is charged its time, as Triton does) and by batch size. Preparing inputs and
outputs is not booked apart (``compute_input``, ``compute_output`` stay 0): images are
decoded before the queue, and the engine call includes its own input and output copies.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["InferenceStats"]


def _duration(count: int = 0, ns: int = 0) -> dict[str, int]:
    return {"count": count, "ns": ns}


class InferenceStats:
    """One model's books (thread-safe: the queues book from the event loop, and a reader may
    read from anywhere)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._books = {k: [0, 0] for k in ("success", "fail", "queue", "compute_infer")}
        self._batches: dict[int, list[int]] = {}
        self.inference_count = 0
        self.execution_count = 0
        #: Milliseconds since the epoch of the last answered request (0: none yet).
        self.last_inference = 0

    def _add(self, key: str, seconds: float, count: int = 1) -> None:
        book = self._books[key]
        book[0] += count
        book[1] += int(seconds * 1e9) * count

    def queued(self, seconds: float) -> None:
        """A request waited ``seconds`` in the queue before its engine call began."""
        with self._lock:
            self._add("queue", seconds)

    def executed(self, rows: int, requests: int, seconds: float) -> None:
        """One successful engine call of ``rows`` rows (images) serving ``requests`` requests."""
        with self._lock:
            self._add("compute_infer", seconds, requests)
            batch = self._batches.setdefault(rows, [0, 0])
            batch[0] += 1
            batch[1] += int(seconds * 1e9)
            self.inference_count += rows
            self.execution_count += 1

    def answered(self, ok: bool, seconds: float) -> None:
        """A request left the queue's hands, answered (``ok``) or failed, ``seconds`` after it arrived."""
        with self._lock:
            self._add("success" if ok else "fail", seconds)
            self.last_inference = int(time.time() * 1000)

    def triton(self, name: str, version: str = "1") -> dict[str, Any]:
        """This model's entry of ``model_stats``."""
        with self._lock:
            books = {k: _duration(*v) for k, v in self._books.items()}
            batches = sorted(self._batches.items())
            return {"name": name, "version": version, "last_inference": self.last_inference,
                    "inference_count": self.inference_count, "execution_count": self.execution_count,
                    "inference_stats": {"success": books["success"], "fail": books["fail"], "queue": books["queue"],
                                        "compute_input": _duration(), "compute_infer": books["compute_infer"],
                                        "compute_output": _duration(), "cache_hit": _duration(),
                                        "cache_miss": _duration()},
                    "batch_stats": [{"batch_size": size, "compute_input": _duration(),
                                     "compute_infer": _duration(count, ns), "compute_output": _duration()}
                                    for size, (count, ns) in batches],
                    "memory_usage": []}
