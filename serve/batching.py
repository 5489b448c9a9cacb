"""Dynamic batching for classifiers and a one-at-a-time job queue for pipelines.

Both are bounded: a request that finds the queue full is refused at once
(:class:`~enginekit.serve.errors.QueueFull`, a 503) instead of waiting behind an
ever longer line. Engine work runs on one thread per model, so the event loop
stays free to accept, refuse and time out requests while an engine computes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from enginekit.serve.errors import QueueFull
from enginekit.serve.stats import InferenceStats

__all__ = ["Batcher", "JobQueue", "Job"]


@dataclass
class _Item:
    rows: np.ndarray
    future: asyncio.Future
    arrived: float


class Batcher:
    """Gathers requests of ``(n, ...)`` rows into one ``run(batch)`` call of up to
    ``max_batch`` rows, waiting at most ``max_delay_s`` after the first arrival;
    each request gets back its own slice of every output.

    The wait applies only when requests are arriving together (more than one is waiting,
    or the last batch held more than one row): a lone request on a quiet model runs at
    once, so batching costs a single client no latency."""

    def __init__(self, name: str, run: Callable[[np.ndarray], dict[str, np.ndarray]], max_batch: int,
                 max_delay_s: float, max_queue: int, on_batch: Callable[[int], None] = lambda n: None,
                 stats: InferenceStats | None = None) -> None:
        self.name = name
        self.stats = stats if stats is not None else InferenceStats()
        self._run = run
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self.busy = False
        self._last_rows = 0

    @property
    def depth(self) -> int:
        return sum(1 for item in self._queue if not item.future.done())

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for ``rows``; cancelling the awaiting task (a timeout) drops the request
        if its batch has not started yet."""
        if self._task is None:
            self.start()
        if self.depth >= self.max_queue:
            raise QueueFull(self.name)
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(rows, future, time.monotonic()))
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            together = self._last_rows > 1 or self._rows_waiting() > 1
            deadline = self._queue[0].arrived + (self.max_delay_s if together else 0.0)
            while self._rows_waiting() < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            rows = np.concatenate([item.rows for item in batch]) if len(batch) > 1 else batch[0].rows
            self._last_rows = len(rows)
            self._on_batch(len(rows))
            self.busy = True
            began = time.monotonic()
            for item in batch:
                self.stats.queued(began - item.arrived)
            try:
                out = await loop.run_in_executor(self._executor, self._run, rows)
            except BaseException as exc:  # every waiter gets the error, the loop goes on
                for item in batch:
                    self.stats.answered(False, time.monotonic() - item.arrived)
                    if not item.future.done():
                        item.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            finally:
                self.busy = False
            done = time.monotonic()
            self.stats.executed(len(rows), len(batch), done - began)
            start = 0
            for item in batch:
                n = len(item.rows)
                # A request that timed out while its batch ran gets no answer: booked as failed.
                self.stats.answered(not item.future.done(), done - item.arrived)
                if not item.future.done():
                    item.future.set_result({k: v[start:start + n] for k, v in out.items()})
                start += n

    def _rows_waiting(self) -> int:
        return sum(len(item.rows) for item in self._queue if not item.future.done())

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        rows = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # timed out or cancelled while waiting
                self._queue.popleft()
                self.stats.answered(False, time.monotonic() - item.arrived)
                continue
            if batch and rows + len(item.rows) > self.max_batch:
                break
            batch.append(self._queue.popleft())
            rows += len(item.rows)
        return batch

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class Job:
    """One generation: its arguments, progress and cancellation."""

    id: str
    kwargs: dict[str, Any]
    future: asyncio.Future
    cancel: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    steps: int = 0
    state: str = "queued"  # queued, running, done, cancelled, failed
    started: float = 0.0
    listeners: list[asyncio.Queue] = field(default_factory=list)
    arrived: float = field(default_factory=time.monotonic)
    #: The latents after the last finished step (a reference the engine thread replaces each
    #: step; read only when someone asks for a preview).
    latents: Any = None
    #: The last preview made, (latents, image): polling faster than the steps costs nothing.
    preview: Any = None


class JobQueue:
    """Runs ``run(job)`` for one job at a time, in arrival order; at most ``max_queue`` wait."""

    def __init__(self, name: str, run: Callable[[Job], Any], max_queue: int,
                 stats: InferenceStats | None = None) -> None:
        self.name = name
        self.stats = stats if stats is not None else InferenceStats()
        self._run = run
        self.max_queue = max_queue
        self._queue: deque[Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"jobs-{name}")
        self.current: Job | None = None
        self._loop_ref: asyncio.AbstractEventLoop | None = None

    @property
    def depth(self) -> int:
        """Jobs waiting to run: a cancelled one (its request timed out or left) no longer counts."""
        return sum(1 for job in self._queue if not job.future.done() and not job.cancel.is_set())

    def start(self) -> None:
        self._loop_ref = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = self._loop_ref.create_task(self._loop())

    def submit(self, job_id: str, kwargs: dict[str, Any]) -> Job:
        """Queue a job (QueueFull when the line is full); await ``job.future`` for its result."""
        if self._task is None:
            self.start()
        if self.depth >= self.max_queue:
            raise QueueFull(self.name)
        job = Job(job_id, kwargs, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wake.set()
        return job

    def progress(self, job: Job, step: int, steps: int) -> None:
        """Called from the engine thread after each step."""
        job.step, job.steps = step, steps
        self._loop_ref.call_soon_threadsafe(self._notify, job, {"step": step, "steps": steps})

    def _notify(self, job: Job, event: dict[str, Any]) -> None:
        for queue in job.listeners:
            queue.put_nowait(event)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            job = self._queue.popleft()
            if job.future.done() or job.cancel.is_set():
                job.state = "cancelled"
                self.stats.answered(False, time.monotonic() - job.arrived)
                if not job.future.done():
                    job.future.cancel()
                continue
            job.state, job.started, self.current = "running", time.monotonic(), job
            self.stats.queued(job.started - job.arrived)
            try:
                result = await loop.run_in_executor(self._executor, self._run, job)
            except BaseException as exc:
                job.state = "cancelled" if job.cancel.is_set() else "failed"
                self.stats.answered(False, time.monotonic() - job.arrived)
                if not job.future.done():
                    job.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
            else:
                job.state = "done"
                done = time.monotonic()
                self.stats.executed(int(job.kwargs.get("num_images_per_prompt") or 1), 1, done - job.started)
                self.stats.answered(not job.future.done(), done - job.arrived)
                if not job.future.done():
                    job.future.set_result(result)
            finally:
                self.current = None
                self._notify(job, {"end": job.state})

    def cancel_current(self) -> Job | None:
        """Set the cancel event of the job running now; that job (None when idle)."""
        job = self.current
        if job is None:
            return None
        job.cancel.set()
        return job

    def close(self) -> None:
        for job in list(self._queue) + ([self.current] if self.current else []):
            job.cancel.set()
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
