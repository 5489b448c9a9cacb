"""One served model: loaded and warmed in the background, then fronted by a
batcher (classifiers) or a job queue (pipelines). A model that fails to load
stays listed, not ready, with the reason."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.errors import EngineKitError
from enginekit.serve.batching import Batcher, Job, JobQueue
from enginekit.serve.errors import ApiError, scrub
from enginekit.serve.metrics import Metrics
from enginekit.serve.settings import ServeSettings

__all__ = ["ModelSlot", "CLASSIFIER", "PIPELINE"]

log = logging.getLogger("enginekit.serve")

CLASSIFIER = "image-classification"
PIPELINE = "text-to-image"


class ModelSlot:
    """A model's name, state (``loading``, ``ready``, ``failed``), the reason of a failure,
    its task object and the queue in front of it."""

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
            obj = enginekit.load(self.path, device=self.settings.device, digest=self.settings.pins.get(self.name),
                                 verify_with=self.settings.verify_with)
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
            self.batcher = Batcher(self.name, self.obj.run_pixels, s.max_batch, s.max_delay_ms / 1000.0,
                                   s.max_queue, on_batch=self.metrics.batch_size.labels(self.name).observe)
            self.batcher.start()
        else:
            self.jobs = JobQueue(self.name, self._generate, s.max_queue)
            self.jobs.start()
        self.state, self.reason = "ready", "ready"
        self.metrics.model_ready.labels(self.name).set(1)

    def _generate(self, job: Job) -> Any:
        steps = job.kwargs.get("num_inference_steps", 50)
        if job.kwargs.get("image") is not None:  # image-to-image runs the last `strength` of the schedule
            steps = max(1, min(int(steps * job.kwargs.get("strength", 0.8)), steps))

        def callback(i: int, t: float, latents: np.ndarray) -> None:
            self.jobs.progress(job, i + 1, job.steps or steps)

        job.steps = steps
        try:
            return self.obj(**job.kwargs, callback=callback, cancel=job.cancel)
        except EngineKitError:
            raise
        except Exception as exc:
            # Parameters the checks let through but this engine cannot run (an exported UNet
            # whose skip connections need a larger latent, a static shape): the request's fault.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("model %s: the engine failed on a request: %s", self.name, first)
            raise ApiError(422, f"the engine cannot run these parameters (height, width, ...): "
                                f"{scrub(first, self.known_paths())[:300]}") from None

    @property
    def depth(self) -> int:
        queue = self.batcher or self.jobs
        return queue.depth if queue is not None else 0

    # ------------------------------------------------------------------ descriptions

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "state": self.state, "ready": self.ready, "task": self.task}
        if self.state == "failed":
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
