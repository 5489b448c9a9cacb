"""One served model: loaded and warmed in the background, then fronted by a
batcher (classifiers) or a job queue (pipelines). A model that fails to load
stays listed, not ready, with the reason."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.errors import BackendError, EngineKitError, RunInterrupted, one_line
from enginekit.runtimes.tasks.text_to_image import GenerationCancelled
from enginekit.serve.batching import Batcher, Job, JobQueue
from enginekit.serve.errors import ApiError, scrub
from enginekit.serve.metrics import Metrics
from enginekit.serve.settings import PIXEL_FACTOR, ServeSettings

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
        self.batcher: Batcher | None = None
        self.jobs: JobQueue | None = None
        self.load_seconds: float | None = None
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
            if task not in (CLASSIFIER, PIPELINE):
                raise EngineKitError(f"task {task!r} cannot be served (serve runs {CLASSIFIER} and {PIPELINE})")
            self.obj, self.task = obj, task
            if self.settings.warmup:
                self._warm()
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

    def _warm(self) -> None:
        if self.task == CLASSIFIER:
            h, w = self.obj.preprocessing.size
            self.obj.run_pixels(np.zeros((1, 3, h, w), dtype=np.float32))
        else:
            self.obj("warm-up", num_inference_steps=1, guidance_scale=7.5, seed=0, output_type="np")
            if "vae_encoder" in self.obj.components:
                self.obj.components["vae_encoder"]  # opened now, not on the first image-to-image request

    def start(self) -> None:
        """In the event loop, once loaded: put the batcher or the job queue in front."""
        s = self.settings
        if self.task == CLASSIFIER:
            self.batcher = Batcher(self.name, self._classify, s.max_batch, s.max_delay_ms / 1000.0,
                                   s.max_queue, on_batch=self.metrics.batch_size.labels(self.name).observe)
            self.batcher.start()
        else:
            self.jobs = JobQueue(self.name, self._generate, s.max_queue)
            self.jobs.start()
        self.state, self.reason = "ready", "ready"
        self.metrics.model_ready.labels(self.name).set(1)

    def _classify(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return self.obj.run_pixels(rows)
        except Exception:
            self._check_engines()
            raise

    def cancel(self, job: Job) -> None:
        """Stop ``job``: a queued one never runs; a running one stops at its next step, and
        its engine call in flight is interrupted where the backend can."""
        job.cancel.set()
        self.interrupt(job)
        self.metrics.queue_depth.labels(self.name).set(self.depth)

    def _generate(self, job: Job) -> Any:
        steps = job.kwargs.get("num_inference_steps") or self.obj.config.default_steps
        if job.kwargs.get("image") is not None:  # image-to-image runs the last `strength` of the schedule
            steps = max(1, min(int(steps * job.kwargs.get("strength", 0.8)), steps))

        def callback(i: int, t: float, latents: np.ndarray) -> None:
            self.jobs.progress(job, i + 1, job.steps or steps)

        job.steps = steps
        with self._running_lock:
            self._running_job = job
        try:
            return self.obj(**job.kwargs, callback=callback, cancel=job.cancel)
        except RunInterrupted:
            if job.cancel.is_set():  # stopped by interrupt(): what the caller asked for
                raise GenerationCancelled("generation cancelled during an engine call") from None
            raise
        except BackendError as exc:  # an engine failed on this request; the next one runs as before
            self._check_engines()
            if not self.ready:
                raise ApiError(503, f"model {self.name!r} is out of service: {self.reason}") from None
            log.warning("model %s: the engine failed on a request: %s", self.name, exc)
            raise ApiError(422, f"the engine cannot run these parameters (height, width, ...): "
                                f"{scrub(one_line(exc), self.known_paths())}") from None
        except EngineKitError:
            raise
        except Exception as exc:
            # Parameters the checks let through but this engine cannot run: the request's fault.
            first = one_line(exc)
            log.warning("model %s: the engine failed on a request: %s", self.name, first)
            self._check_engines()
            raise ApiError(422, f"the engine cannot run these parameters (height, width, ...): "
                                f"{scrub(first, self.known_paths())[:300]}") from None
        finally:
            with self._running_lock:
                self._running_job = None

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
            names = getattr(components, "loaded", None)
            names = tuple(components) if names is None else names
            return [components[n] for n in names]
        runner = getattr(self.obj, "runner", None)
        return [runner] if runner is not None else []

    def _check_engines(self) -> None:
        """After a failed call: a broken engine (its recovery failed) takes the model out of service."""
        broken = [r for r in self.runners() if getattr(r, "broken", None)]
        if broken and self.state == "ready":
            runner = broken[0]
            self.state = "broken"
            self.reason = scrub(f"engine {runner.component or 'model'!r} broke: {runner.broken}".splitlines()[0],
                                self.known_paths())
            self.metrics.model_ready.labels(self.name).set(0)
            log.error("model %s is out of service: %s", self.name, self.reason)

    def max_pixels(self, settings: ServeSettings) -> int:
        """Pixels one generation may ask for: ``--max-pixels``, else the model's own size x PIXEL_FACTOR."""
        if settings.max_pixels is not None:
            return settings.max_pixels
        return self.obj.config.default_size ** 2 * PIXEL_FACTOR

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
            if self.task == CLASSIFIER:
                out["labels"] = list(self.obj.labels)
            else:
                out["family"] = self.obj.manifest.family
                out["default_size"] = self.obj.config.default_size
                out["max_pixels"] = self.max_pixels(self.settings)
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
