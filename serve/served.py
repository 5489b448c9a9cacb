"""How one task is served: the object a :class:`~enginekit.serve.models.ModelSlot` asks for
everything that differs by task (warming up, the queue in front, what ``/v2/models`` says,
KServe's metadata, config and inference), chosen once from the loaded model's task through
the task registry (``TaskStages.serve``). Nothing else in the server tests a task name: an
endpoint names the task it runs (``state.pick(task, ...)``) and the slot answers whether it
serves it.

A new servable task is one :class:`Served` subclass named by its task's ``serve`` stage.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from enginekit.errors import BackendError, EngineKitError, RunInterrupted, one_line
from enginekit.serve.batching import Batcher, Job, JobQueue
from enginekit.serve.errors import ApiError, scrub
from enginekit.serve.settings import PIXEL_FACTOR, ServeSettings

if TYPE_CHECKING:
    from fastapi import Request

    from enginekit.serve.models import ModelSlot

__all__ = ["Served", "ServedClassifier", "ServedPipeline", "v2_dtype", "v2_dims"]

log = logging.getLogger("enginekit.serve")

_V2_DTYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
              "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
              "float32": "FP32", "float64": "FP64"}


def v2_dtype(numpy_name: str) -> str:
    """KServe v2's datatype name for a numpy dtype name (FP32 for what it has no name for)."""
    return _V2_DTYPES.get(np.dtype(numpy_name).name, "FP32")


def v2_dims(shape: Any) -> list[int]:
    """A shape as KServe writes it: -1 for every dynamic or unknown dimension."""
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


class Served:
    """The task-specific half of a served model (the slot keeps the task-free half: state,
    engines, cancellation)."""

    #: Whether the A1111 API (``/sdapi/v1/*``) lists and runs this model.
    a1111 = False

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot
        self.obj = slot.obj

    def warm(self) -> None:
        """One call at load time, so the first request does not pay for the engines' set-up."""
        raise NotImplementedError

    def start(self, settings: ServeSettings) -> None:
        """Put this task's queue in front of the model (in the event loop, once loaded)."""
        raise NotImplementedError

    def describe(self, settings: ServeSettings) -> dict[str, Any]:
        """What ``/v2/models`` adds for a loaded model of this task."""
        return {}

    def kserve_io(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """KServe's input and output tensor metadata."""
        raise NotImplementedError

    def kserve_batching(self, settings: ServeSettings) -> dict[str, Any]:
        """KServe's ``max_batch_size`` and ``dynamic_batching`` model config."""
        return {"max_batch_size": 0, "dynamic_batching": None}

    async def kserve_infer(self, request: Request, inputs: dict[str, np.ndarray],
                           params: dict[str, Any]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def classification(self, output: str, array: np.ndarray, k: int) -> np.ndarray:
        """Triton's classification extension on ``output``; refused where it does not apply."""
        raise ApiError(400, "classification applies to a classifier's 'logits' output")


class ServedClassifier(Served):
    """An image classifier: rows batched dynamically (``--max-batch``, ``--max-delay-ms``)."""

    def warm(self) -> None:
        h, w = self.obj.preprocessing.size
        self.obj.run_pixels(np.zeros((1, 3, h, w), dtype=np.float32))

    def start(self, settings: ServeSettings) -> None:
        slot = self.slot
        slot.batcher = Batcher(slot.name, self._classify, settings.max_batch, settings.max_delay_ms / 1000.0,
                               settings.max_queue, on_batch=slot.metrics.batch_size.labels(slot.name).observe,
                               stats=slot.stats)
        slot.batcher.start()

    def _classify(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        try:
            return self.obj.run_pixels(rows)
        except Exception:
            self.slot.check_engines()
            raise

    def describe(self, settings: ServeSettings) -> dict[str, Any]:
        return {"labels": list(self.obj.labels)}

    def kserve_io(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        runner = self.obj.runner
        spec = runner.inputs[0]
        inputs = [{"name": spec.name, "datatype": v2_dtype(spec.dtype), "shape": [-1, *v2_dims(spec.shape[1:])]},
                  {"name": "image", "datatype": "BYTES", "shape": [-1]}]
        outputs = [{"name": o.name, "datatype": v2_dtype(o.dtype), "shape": [-1, *v2_dims(o.shape[1:])]}
                   for o in runner.outputs]
        return inputs, outputs

    def kserve_batching(self, settings: ServeSettings) -> dict[str, Any]:
        batching = ({"max_queue_delay_microseconds": int(settings.max_delay_ms * 1000)}
                    if settings.max_batch > 1 else None)
        return {"max_batch_size": settings.max_batch, "dynamic_batching": batching}

    async def kserve_infer(self, request: Request, inputs: dict[str, np.ndarray],
                           params: dict[str, Any]) -> dict[str, np.ndarray]:
        from enginekit.serve.classify import classify_rows, decode_images, explain_field

        state, slot = request.app.state.server, self.slot
        spec = self.obj.runner.inputs[0]
        limit = state.settings.max_images
        method = explain_field(params.get("explain", False))
        if method and set(inputs) != {"image"}:
            raise ApiError(400, "the explain parameter takes the 'image' input (BYTES, encoded images): the map "
                                "and its box are placed on the image given")
        if set(inputs) == {"image"}:
            images = [bytes(v) for v in inputs["image"].reshape(-1)]
            if not images or len(images) > limit:
                raise ApiError(413 if images else 400, f"input 'image': 1 to {limit} images per request")
            pixels = await decode_images(state, slot, images)
        elif set(inputs) == {spec.name}:
            pixels = inputs[spec.name]
            if pixels.dtype != np.float32:
                raise ApiError(400, f"input {spec.name!r} must be FP32, got {v2_dtype(pixels.dtype.name)}")
            want = tuple(v2_dims(spec.shape[1:]))
            if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want or not 1 <= len(pixels) <= limit:
                raise ApiError(400, f"input {spec.name!r} must have shape [1..{limit}, "
                                    f"{', '.join(map(str, want))}], got {list(pixels.shape)}")
            if not np.isfinite(pixels).all():
                raise ApiError(400, f"input {spec.name!r} holds NaN or infinite values")
        else:
            raise ApiError(400, f"model {slot.name!r} takes one input, {spec.name!r} (FP32) or 'image' (BYTES); "
                                f"got {sorted(inputs)}")
        outputs = dict(await classify_rows(state, slot, np.ascontiguousarray(pixels)))
        if method:
            outputs.update(await self._explanations(state, images, method))
        return outputs

    async def _explanations(self, state: Any, images: list[bytes], method: str) -> dict[str, np.ndarray]:
        """The ``explain`` parameter's extra outputs: ``explanation`` (FP32, N x rows x columns: the
        map on the model's grid), ``explanation_box`` (FP32, N x 4: where the model's input lies on
        each image, left/top/right/bottom in its pixels) and ``explanation_png`` (BYTES: base64 PNG
        overlays), the same as /v1/classify?explain=true gives."""
        import base64

        from enginekit.serve.classify import explained

        found = await explained(state, self.slot, images, method,
                                lambda e, image: (np.asarray(e.grid, np.float32), np.asarray(e.box, np.float32),
                                                  base64.b64encode(e.overlay_png(image))))
        grids = [g for g, _, _ in found]
        if len({g.shape for g in grids}) != 1:
            raise ApiError(500, f"model {self.slot.name!r} gave maps of different shapes for one request")
        return {"explanation": np.stack(grids), "explanation_box": np.stack([b for _, b, _ in found]),
                "explanation_png": np.array([p for _, _, p in found], dtype=np.object_)}

    def classification(self, output: str, array: np.ndarray, k: int) -> np.ndarray:
        """The top ``k`` as ``b"score:index:label"``, best first."""
        from enginekit.runtimes.tasks.classifier import softmax

        if output != "logits":
            return super().classification(output, array, k)
        probs = softmax(array)
        k = min(k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        labels = self.obj.labels
        rows = [[f"{row[i]:f}:{int(i)}:{labels[int(i)]}".encode() for i in idx] for row, idx in zip(probs, order)]
        return np.array(rows, dtype=np.object_)


class ServedPipeline(Served):
    """A text-to-image pipeline: one generation at a time from a job queue, cancellable
    between steps and (where the backend can) inside an engine call."""

    a1111 = True

    def warm(self) -> None:
        self.obj("warm-up", num_inference_steps=1, guidance_scale=7.5, seed=0, output_type="np")
        if "vae_encoder" in self.obj.components:
            self.obj.components["vae_encoder"]  # opened now, not on the first image-to-image request

    def start(self, settings: ServeSettings) -> None:
        slot = self.slot
        slot.jobs = JobQueue(slot.name, self._generate, settings.max_queue, stats=slot.stats)
        slot.jobs.start()

    def max_pixels(self, settings: ServeSettings) -> int:
        """Pixels one generation may ask for: ``--max-pixels``, else the model's own size x PIXEL_FACTOR."""
        if settings.max_pixels is not None:
            return settings.max_pixels
        return self.obj.config.default_size ** 2 * PIXEL_FACTOR

    def describe(self, settings: ServeSettings) -> dict[str, Any]:
        return {"family": self.obj.manifest.family, "default_size": self.obj.config.default_size,
                "max_pixels": self.max_pixels(settings)}

    def kserve_io(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        size = self.obj.config.default_size
        inputs = [{"name": "prompt", "datatype": "BYTES", "shape": [1]},
                  {"name": "negative_prompt", "datatype": "BYTES", "shape": [1]}]
        return inputs, [{"name": "image", "datatype": "UINT8", "shape": [-1, size, size, 3]}]

    async def kserve_infer(self, request: Request, inputs: dict[str, np.ndarray],
                           params: dict[str, Any]) -> dict[str, np.ndarray]:
        from enginekit.serve.tasks import GenerateRequest, run_generation

        slot = self.slot
        unknown = set(inputs) - {"prompt", "negative_prompt"}
        if "prompt" not in inputs or unknown:
            raise ApiError(400, f"model {slot.name!r} takes 'prompt' (and 'negative_prompt') as BYTES; "
                                f"got {sorted(inputs)}")
        fields: dict[str, Any] = {}
        for key in ("prompt", "negative_prompt"):
            if key in inputs:
                values = inputs[key].reshape(-1)
                if len(values) != 1 or not isinstance(values[0], bytes):
                    raise ApiError(400, f"input {key!r}: one BYTES element")
                try:
                    fields[key] = values[0].decode("utf-8")
                except UnicodeDecodeError:
                    raise ApiError(400, f"input {key!r} is not UTF-8") from None
        for key in ("steps", "guidance", "seed", "height", "width", "scheduler", "cache", "num_images"):
            if key in params:
                fields[key] = params[key]
        req = GenerateRequest.checked(fields, request.app.state.server.settings)
        out = await run_generation(request, slot, req)
        return {"image": np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in out.images])}

    def _generate(self, job: Job) -> Any:
        from enginekit.runtimes.tasks.text_to_image import GenerationCancelled

        slot = self.slot
        steps = job.kwargs.get("num_inference_steps") or self.obj.config.default_steps
        if job.kwargs.get("image") is not None:  # image-to-image runs the last `strength` of the schedule
            from enginekit.runtimes.tasks.call_args import default_strength, is_inpainting

            strength = job.kwargs.get("strength")
            if strength is None:
                strength = default_strength(is_inpainting(self.obj.config, job.kwargs.get("mask_image")))
            steps = max(1, min(int(steps * strength), steps))

        def callback(i: int, t: float, latents: np.ndarray) -> None:
            job.latents = latents  # a reference only: a preview is made when someone asks for one
            slot.jobs.progress(job, i + 1, job.steps or steps)

        job.steps = steps
        slot.running(job)
        try:
            return self.obj(**job.kwargs, callback=callback, cancel=job.cancel)
        except RunInterrupted:
            if job.cancel.is_set():  # stopped by interrupt(): what the caller asked for
                raise GenerationCancelled("generation cancelled during an engine call") from None
            raise
        except BackendError as exc:  # an engine failed on this request; the next one runs as before
            slot.check_engines()
            if not slot.ready:
                raise ApiError(503, f"model {slot.name!r} is out of service: {slot.reason}") from None
            log.warning("model %s: the engine failed on a request: %s", slot.name, exc)
            raise ApiError(422, f"the engine cannot run these parameters (height, width, ...): "
                                f"{scrub(one_line(exc), slot.known_paths())}") from None
        except EngineKitError:
            raise
        except Exception as exc:
            # Parameters the checks let through but this engine cannot run: the request's fault.
            first = one_line(exc)
            log.warning("model %s: the engine failed on a request: %s", slot.name, first)
            slot.check_engines()
            raise ApiError(422, f"the engine cannot run these parameters (height, width, ...): "
                                f"{scrub(first, slot.known_paths())[:300]}") from None
        finally:
            slot.running(None)
            job.latents = job.preview = None
