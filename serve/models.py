"""One served model: loaded and warmed in the background, then fronted by its task's
queue (:mod:`enginekit.serve.served` holds everything that differs by task). A model
that fails to load stays listed, not ready, with the reason."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any


from enginekit.errors import EngineKitError, UnsupportedStageError
from enginekit.registry import stage, task_names, task_stages
from enginekit.serve.batching import Batcher, Job, JobQueue
from enginekit.serve.errors import scrub
from enginekit.serve.metrics import Metrics
from enginekit.serve.served import Served
from enginekit.serve.settings import ServeSettings
from enginekit.serve.stats import InferenceStats

__all__ = ["ModelSlot", "CLASSIFIER", "PIPELINE"]

log = logging.getLogger("enginekit.serve")

CLASSIFIER = "image-classification"
PIPELINE = "text-to-image"


class ModelSlot:
    """A model's name, state (``loading``, ``ready``, ``failed`` to load, ``broken``: an
    engine failed and could not be put back), the reason when not ready, its task object
    and the queue in front of it."""

    def __init__(self, name: str, path: Path, settings: ServeSettings, metrics: Metrics) -> None:
        self.name = name
        self.path = Path(path)
        self.settings = settings
        self.metrics = metrics
        self.state = "loading"
        self.reason = "loading"
        self.task: str | None = None
        self.obj: Any = None
        #: The task-specific half (:mod:`enginekit.serve.served`), once loaded.
        self.served: Served | None = None
        self.batcher: Batcher | None = None
        self.jobs: JobQueue | None = None
        self.load_seconds: float | None = None
        #: Triton-style statistics, booked by the queue in front of the model.
        self.stats = InferenceStats()
        self._digest: str | None = None
        self._running_lock = threading.Lock()
        self._running_job: Job | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def known_paths(self) -> list[tuple[str, str]]:
        paths = [(str(self.path), self.name)]
        try:
            paths.append((str(self.path.resolve()), self.name))
        except OSError:
            pass
        return paths

    # ------------------------------------------------------------------ loading (a worker thread)

    def load(self) -> None:
        """Open, verify and warm the artifact; any failure marks this model failed, with why."""
        import enginekit

        t0 = time.perf_counter()
        try:
            # A server hashes every file it serves: a verified-file cache record, forged by anyone
            # who can write as this user, must not vouch for bytes it did not hash.
            obj = enginekit.load(self.path, device=self.settings.device, digest=self.settings.pins.get(self.name),
                                 verify_with=self.settings.verify_with, hash_all=True)
            task = getattr(obj, "task", None)
            try:
                served = stage(str(task), "serve")
            except UnsupportedStageError:
                raise EngineKitError(f"task {task!r} cannot be served (serve runs "
                                     f"{', '.join(t for t in task_names() if task_stages(t).serve)})") from None
            self.obj, self.task = obj, task
            self.served = served(self)
            if self.settings.warmup:
                self.served.warm()
        except Exception as exc:  # one bad artifact must not take the server down
            reason = str(exc) if isinstance(exc, EngineKitError) else f"{type(exc).__name__}: {exc}"
            self.fail(reason)
            return
        self.load_seconds = time.perf_counter() - t0
        log.info("model %s ready (%s, %.1f s)", self.name, self.task, self.load_seconds)

    def fail(self, reason: str) -> None:
        self.state = "failed"
        self.reason = scrub(reason.splitlines()[0] if reason else "failed to load", self.known_paths())
        self.metrics.model_ready.labels(self.name).set(0)
        log.warning("model %s failed to load: %s", self.name, self.reason)

    def start(self) -> None:
        """In the event loop, once loaded: put the task's queue (batcher or job queue) in front."""
        self.served.start(self.settings)
        self.state, self.reason = "ready", "ready"
        self.metrics.model_ready.labels(self.name).set(1)

    def serves(self, task: str) -> bool:
        """Whether this model runs ``task``'s endpoints (a model still loading may: its task is not known yet)."""
        return self.task == task

    def cancel(self, job: Job) -> None:
        """Stop ``job``: a queued one never runs; a running one stops at its next step, and
        its engine call in flight is interrupted where the backend can."""
        job.cancel.set()
        self.interrupt(job)
        self.metrics.queue_depth.labels(self.name).set(self.depth)

    def running(self, job: Job | None) -> None:
        """The job whose engine calls :meth:`interrupt` may stop (None: none runs)."""
        with self._running_lock:
            self._running_job = job

    def interrupt(self, job: Job) -> bool:
        """Stop ``job``'s engine call in flight (its cancel event stops it between steps; this
        stops the step itself). Nothing happens when ``job`` is not the one running."""
        with self._running_lock:
            if self._running_job is not job:
                return False
            return any([runner.interrupt() for runner in self.runners()])

    def runners(self) -> list[Any]:
        """The engines this model has open (a pipeline opens its components when first used)."""
        if self.obj is None:
            return []
        components = getattr(self.obj, "components", None)
        if components is not None:
            return components.open_runners()  # never opens one (a low-memory pipeline closes them after use)
        runner = getattr(self.obj, "runner", None)
        return [runner] if runner is not None else []

    def check_engines(self) -> None:
        """After a failed call: a broken engine (its recovery failed) takes the model out of service."""
        broken = [r for r in self.runners() if getattr(r, "broken", None)]
        if broken and self.state == "ready":
            runner = broken[0]
            self.state = "broken"
            self.reason = scrub(f"engine {runner.component or 'model'!r} broke: {runner.broken}".splitlines()[0],
                                self.known_paths())
            self.metrics.model_ready.labels(self.name).set(0)
            log.error("model %s is out of service: %s", self.name, self.reason)

    @property
    def digest(self) -> str | None:
        """The manifest's sha256 (hex; what ``enginekit inspect`` prints and a pin names), None
        until loaded: A1111's model hash is its first 10 digits."""
        if self._digest is None and self.obj is not None:
            self._digest = self.obj.manifest.digest()
        return self._digest

    @property
    def depth(self) -> int:
        queue = self.batcher or self.jobs
        return queue.depth if queue is not None else 0

    # ------------------------------------------------------------------ descriptions

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "state": self.state, "ready": self.ready, "task": self.task}
        if not self.ready:
            out["reason"] = self.reason
        if self.name in self.settings.pins:
            out["pinned"] = self.settings.pins[self.name]
        if self.settings.verify_with:
            out["signature_checked"] = True
        if self.obj is not None:
            out["backend"] = getattr(self.obj, "backend", None)
            out["device"] = getattr(self.obj, "device", None)
            out.update(self.served.describe(self.settings))
        return out

    def close(self) -> None:
        for queue in (self.batcher, self.jobs):
            if queue is not None:
                queue.close()
        if self.obj is not None:
            try:
                self.obj.close()
            except Exception:  # closing at exit: nothing left to tell
                pass
