"""Task endpoint ``POST /v1/generate`` (PNG, JSON or server-sent progress events), over the
models' job queues (``POST /v1/classify`` is in :mod:`enginekit.serve.classify`)."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from enginekit.errors import EngineKitError, InputError, one_line
from enginekit.runtimes.schedulers import SCHEDULERS
from enginekit.serve.loras import resolve_loras
from enginekit.serve.batching import Job
from enginekit.serve.errors import ApiError, status_for
from enginekit.serve.models import PIPELINE, ModelSlot
from enginekit.serve.uploads import b64_image, json_body, open_image
# The classify endpoint's parts lived here before serve/classify.py.
from enginekit.serve.classify import classify_rows, decode_images, predictions  # noqa: F401

__all__ = ["router", "GenerateRequest", "classify_rows", "decode_images", "run_generation", "predictions"]

router = APIRouter(tags=["tasks"])


def _state(request: Request) -> Any:
    return request.app.state.server


# ---------------------------------------------------------------------------- generate

class GenerateRequest(BaseModel):
    """What ``/v1/generate`` takes (JSON, or the same fields as multipart form with an
    ``init_image`` file). Static bounds here; the server's own limits in :meth:`checked`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=100_000)
    negative_prompt: Optional[str] = Field(default=None, max_length=100_000)
    model: Optional[str] = Field(default=None, max_length=64)
    steps: Optional[int] = Field(default=None, ge=1, le=1000, description="absent: the model's own default")
    guidance: Optional[float] = Field(default=None, ge=0.0, le=30.0, description="absent: the model's own default")
    seed: Optional[int] = Field(default=None, ge=-1, le=2**63 - 1, description="-1 or absent: random")
    height: Optional[int] = Field(default=None, ge=8, le=16384)
    width: Optional[int] = Field(default=None, ge=8, le=16384)
    scheduler: Optional[Literal[SCHEDULERS]] = None  # type: ignore[valid-type]
    cache: Optional[str] = Field(default=None, max_length=64,
                                 description="step cache: deepcache[:N], taylorseer[:N][,before=B,after=A,order=K] "
                                             "or none; absent: the model's own")
    num_images: int = Field(default=1, ge=1, le=1024)
    strength: Optional[float] = Field(default=None, gt=0.0, le=1.0,
                                      description="image-to-image: how much to repaint; absent: 0.8, 1.0 with a mask")
    init_image: Optional[str] = Field(default=None, description="image-to-image: base64 of the starting picture")
    mask_image: Optional[str] = Field(default=None, description="inpainting: base64 of the mask (white: repaint), "
                                                                "with init_image; any size (resized to the image's)")
    padding_mask_crop: Optional[int] = Field(default=None, ge=0, le=16384,
                                             description="inpainting: generate the mask's box grown by this many "
                                                         "pixels only, pasted back into the image")
    control_image: Optional[Union[str, list[str]]] = Field(
        default=None, description="ControlNet: base64 control image(s), one per ControlNet the model holds")
    control_map: Optional[Union[str, list[str]]] = Field(
        default=None, description="ControlNet: make the map from control_image (a photo) first: none, "
                                                "canny or canny:LOW,HIGH; one, or one per control image")
    controlnet_conditioning_scale: Optional[Union[float, list[float]]] = None
    control_guidance_start: Optional[Union[float, list[float]]] = None
    control_guidance_end: Optional[Union[float, list[float]]] = None
    loras: Optional[dict[str, float]] = Field(default=None, description="LoRA files of the server's --lora-dir "
                                              "by name -> scale (-10 to 10), for this request only")
    #: The decoded mask and control images (set by parse_generate; the A1111 routes set their own).
    _mask: Any = PrivateAttr(default=None)
    _controls: Any = PrivateAttr(default=None)
    #: ``loras`` as {path: scale} in the server's folder (set by :meth:`checked`).
    _loras: Any = PrivateAttr(default=None)
    response_format: Optional[Literal["png", "json", "sse"]] = None

    @classmethod
    def checked(cls, fields: dict[str, Any], settings: Any) -> GenerateRequest:
        from enginekit.serve.app import validation_message

        try:
            req = cls.model_validate(fields)
        except ValidationError as exc:
            raise ApiError(422, validation_message(exc.errors())) from None
        if len(req.prompt) > settings.max_prompt_chars:
            raise ApiError(422, f"prompt: {len(req.prompt)} characters is over the limit of {settings.max_prompt_chars}")
        if req.negative_prompt is not None and len(req.negative_prompt) > settings.max_prompt_chars:
            raise ApiError(422, f"negative_prompt: over the limit of {settings.max_prompt_chars} characters")
        if req.steps is not None and req.steps > settings.max_steps:
            raise ApiError(422, f"steps: must be from 1 to {settings.max_steps}, got {req.steps}")
        if req.num_images > settings.max_images:
            raise ApiError(422, f"num_images: must be from 1 to {settings.max_images}, got {req.num_images}")
        for name in ("height", "width"):
            side = getattr(req, name)
            if side is not None and (side > settings.max_side or side % 8):
                raise ApiError(422, f"{name}: must be a multiple of 8 up to {settings.max_side}, got {side}")
        req._loras = resolve_loras(settings, req.loras)
        return req

    def pipeline_kwargs(self, init_image: Any = None) -> dict[str, Any]:
        """The pipeline's arguments; steps, guidance and size stay None when the request
        omits them, so the pipeline applies the model's own defaults (its manifest's)."""
        seed = secrets.randbits(63) if self.seed in (None, -1) else self.seed
        kwargs: dict[str, Any] = {"prompt": self.prompt, "negative_prompt": self.negative_prompt,
                                  "num_inference_steps": self.steps, "guidance_scale": self.guidance,
                                  "height": self.height, "width": self.width, "seed": seed,
                                  "num_images_per_prompt": self.num_images, "scheduler": self.scheduler}
        if self.cache is not None:
            kwargs["cache"] = self.cache
        if self._controls is not None:
            kwargs["control_image"] = self._controls if len(self._controls) > 1 else self._controls[0]
            for key in ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"):
                if getattr(self, key) is not None:
                    kwargs[key] = getattr(self, key)
        if self._loras:
            kwargs["loras"] = self._loras
        if init_image is not None:
            kwargs["image"] = init_image
            extra = {"strength": self.strength, "mask_image": self._mask, "padding_mask_crop": self.padding_mask_crop}
            kwargs.update({k: v for k, v in extra.items() if v is not None})  # unset: the library's default
        return kwargs


async def parse_generate(request: Request) -> tuple[GenerateRequest, Any]:
    """The request and its decoded init image (or None), from JSON or multipart."""
    state = _state(request)
    ctype = request.headers.get("content-type", "").lower()
    files: dict[str, bytes] = {}
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=3, max_fields=32)
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                if key not in ("init_image", "mask_image", "control_image") or key in files:
                    raise ApiError(422, f"{key}: only init_image, mask_image and control_image may be files, once "
                                        "each"[:200])
                files[key] = await value.read()
            elif value != "":
                fields[key] = value
    elif ctype.startswith("application/json"):
        fields = await json_body(request)
    else:
        raise ApiError(415, "send application/json, or multipart/form-data with an init_image file")
    req = GenerateRequest.checked(fields, state.settings)
    for name in ("init_image", "mask_image"):
        if getattr(req, name) is not None:
            files[name] = b64_image(getattr(req, name), name)
    if "init_image" not in files and ("mask_image" in files or req.padding_mask_crop is not None):
        raise ApiError(422, "mask_image: inpainting repaints part of an init_image; send one")
    if req.padding_mask_crop is not None and "mask_image" not in files:
        raise ApiError(422, "padding_mask_crop: crops around the mask; send a mask_image too")
    init = await asyncio.to_thread(open_image, files["init_image"], 0, state.settings) if "init_image" in files else None
    if "mask_image" in files:
        req._mask = await asyncio.to_thread(open_image, files["mask_image"], 1, state.settings, "mask_image")
    await decode_controls(req, state.settings, files.get("control_image"))
    return req, init


async def decode_controls(req: GenerateRequest, settings: Any, upload: bytes | None = None) -> None:
    """The request's control images (base64 in ``control_image``, or one uploaded file) decoded into it."""
    items = [req.control_image] if isinstance(req.control_image, str) else list(req.control_image or [])
    controls = [upload] if upload is not None else [b64_image(v, f"control_image[{i}]") for i, v in enumerate(items)]
    if len(controls) > 8:
        raise ApiError(422, "control_image: at most 8 control images")
    if req.control_map is not None and not controls:
        raise ApiError(422, "control_map makes the control map from a photo: give it as control_image")
    if controls:
        req._controls = [await asyncio.to_thread(open_image, data, i, settings, f"control_image[{i}]")
                         for i, data in enumerate(controls)]
        if req.control_map is not None:
            from enginekit.runtimes.control_maps import apply_control_maps

            try:
                req._controls = await asyncio.to_thread(apply_control_maps, req._controls, req.control_map,
                                                        "control_map")
            except InputError as exc:
                raise ApiError(422, str(exc)) from None


def check_pixels(slot: ModelSlot, req: GenerateRequest, settings: Any, init: Any = None) -> None:
    """413 when the request asks for more pixels (height x width x images, the model's own size
    or the init image's where it names none) than this server makes for this model."""
    default = slot.obj.config.default_size
    height = req.height or (init.height if init is not None else default)
    width = req.width or (init.width if init is not None else default)
    limit = slot.served.max_pixels(settings)
    if height * width * req.num_images > limit:
        raise ApiError(413, f"{width}x{height} x {req.num_images} image(s) is over this server's limit of {limit} "
                            f"pixels per request for model {slot.name!r} (--max-pixels)")


def submit_job(request: Request, slot: ModelSlot, req: GenerateRequest, init: Any = None) -> Job:
    state = _state(request)
    if req.height is not None or req.width is not None:
        # The sizes this engine takes (diffusers' rule for its pipeline, or a static engine's
        # one size), refused before anything is queued; an omitted side is the model's own.
        from enginekit.runtimes.tasks.sizes import check_size, size_rule

        cfg = slot.obj.config
        rule = size_rule(cfg, slot.obj.manifest.components, state.settings.max_side)
        fixed_h, fixed_w = rule.fixed or (cfg.default_size, cfg.default_size)
        try:
            check_size(rule, req.height or fixed_h, req.width or fixed_w)
        except EngineKitError as exc:
            raise ApiError(422, str(exc)) from None
    try:
        check_pixels(slot, req, state.settings, init)
    except ApiError:
        state.metrics.rejections.labels(slot.name, "too_large").inc()
        raise
    try:
        job = slot.jobs.submit(uuid.uuid4().hex, req.pipeline_kwargs(init))
    except ApiError:
        state.metrics.rejections.labels(slot.name, "queue_full").inc()
        raise
    job.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no stray log
    state.metrics.queue_depth.labels(slot.name).set(slot.depth)
    return job


async def await_job(request: Request, slot: ModelSlot, job: Job) -> Any:
    """The job's result; 504 (and the job cancelled) past the timeout, cancelled if the client leaves."""
    state = _state(request)
    deadline = time.monotonic() + state.settings.timeout_s
    while not job.future.done():
        left = deadline - time.monotonic()
        if left <= 0:
            slot.cancel(job)
            state.metrics.rejections.labels(slot.name, "timeout").inc()
            raise ApiError(504, f"model {slot.name!r} did not finish within {state.settings.timeout_s:g} s; "
                                "the generation was cancelled")
        await asyncio.wait({job.future}, timeout=min(left, 0.2))
        if not job.future.done() and await request.is_disconnected():
            slot.cancel(job)
            state.metrics.rejections.labels(slot.name, "client_gone").inc()
            raise ClientGone()
    return job.future.result()


class ClientGone(ApiError):
    def __init__(self) -> None:
        super().__init__(499, "client closed the connection; the generation was cancelled")


async def run_generation(request: Request, slot: ModelSlot, req: GenerateRequest, init: Any = None) -> Any:
    return await await_job(request, slot, submit_job(request, slot, req, init))


def png_bytes(image: Any, infotext: str | None = None) -> bytes:
    """``image`` as PNG, carrying ``infotext`` as A1111's ``parameters`` text chunk."""
    from enginekit.runtimes.png_info import image_bytes

    return image_bytes(image, infotext)


def generation_params(slot: ModelSlot, req: GenerateRequest, out: Any, image_to_image: bool) -> Any:
    """What made ``out`` (a :class:`~enginekit.runtimes.png_info.GenerationParams`): the
    request's values, the model's own defaults where the request left one unset."""
    from enginekit.runtimes.png_info import GenerationParams, lora_hashes

    config = slot.obj.config
    first = out.images[0]
    return GenerationParams(
        prompt=req.prompt, negative_prompt=req.negative_prompt,
        steps=req.steps if req.steps is not None else config.default_steps,
        scheduler=req.scheduler or config.default_scheduler,
        cfg_scale=req.guidance if req.guidance is not None else config.default_guidance_scale,
        seed=out.seed, width=first.width, height=first.height, model=slot.name,
        model_hash=slot.digest[:10] if slot.digest else None,
        denoising_strength=_strength(config, req) if image_to_image else None, batch_size=len(out.images),
        lora_hashes=lora_hashes(getattr(out, "loras", ())))


def _strength(config: Any, req: GenerateRequest) -> float:
    """The strength an image-to-image or inpainting request ran at (the library's default where unset)."""
    from enginekit.runtimes.tasks.call_args import default_strength, is_inpainting

    return req.strength if req.strength is not None else default_strength(is_inpainting(config, req._mask))


def images_json(slot: ModelSlot, out: Any, params: Any = None) -> dict[str, Any]:
    """The images as base64 PNGs, each carrying its ``params`` (when given) as infotext."""
    texts = [params.at(i).infotext() if params is not None else None for i in range(len(out.images))]
    return {"model": slot.name, "seed": out.seed,
            "images": [base64.b64encode(png_bytes(im, text)).decode("ascii") for im, text in zip(out.images, texts)]}


@router.post("/v1/generate", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": GenerateRequest.model_json_schema()}}}},
    responses={200: {"content": {"image/png": {}, "application/json": {}, "text/event-stream": {}}}})
async def generate(request: Request) -> Response:
    """Text-to-image (image-to-image with ``init_image``). Answers PNG bytes by default,
    JSON with base64 images for ``response_format=json`` (or ``Accept: application/json``),
    and progress as server-sent events for ``response_format=sse`` (or ``Accept: text/event-stream``)."""
    state = _state(request)
    req, init = await parse_generate(request)
    slot = state.pick(PIPELINE, req.model)
    request.state.model = slot.name
    accept = request.headers.get("accept", "")
    fmt = req.response_format or ("sse" if "text/event-stream" in accept else
                                  "json" if "application/json" in accept and "image/png" not in accept else "png")
    if fmt == "png" and req.num_images > 1:
        raise ApiError(422, "response_format: PNG answers one image; ask for json (or sse) with num_images > 1")
    if fmt == "sse":
        job = submit_job(request, slot, req, init)
        listener: asyncio.Queue = asyncio.Queue()
        job.listeners.append(listener)  # now, not when the stream starts: no step is missed
        return StreamingResponse(_events(state, slot, job, listener, req, init is not None),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Job-Id": job.id})
    out = await run_generation(request, slot, req, init)
    params = generation_params(slot, req, out, init is not None)
    if fmt == "json":
        return JSONResponse(images_json(slot, out, params))
    return Response(png_bytes(out.images[0], params.infotext()), media_type="image/png",
                    headers={"X-Seed": str(out.seed)})


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _events(state: Any, slot: ModelSlot, job: Job, listener: asyncio.Queue, req: GenerateRequest,
                  image_to_image: bool) -> AsyncIterator[bytes]:
    """``queued``, then ``progress`` per step, then ``done`` (with the images) or ``error``.
    Leaving early (the client disconnected) cancels the generation."""
    deadline = time.monotonic() + state.settings.timeout_s
    try:
        yield _sse("queued", {"id": job.id, "position": slot.depth})
        while not job.future.done():
            left = deadline - time.monotonic()
            if left <= 0:
                slot.cancel(job)
                state.metrics.rejections.labels(slot.name, "timeout").inc()
                yield _sse("error", {"status": 504, "error": f"did not finish within {state.settings.timeout_s:g} s"})
                return
            getter = asyncio.ensure_future(listener.get())
            await asyncio.wait({getter, job.future}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                event = getter.result()
                if "step" in event:
                    yield _sse("progress", {"id": job.id, **event})
            else:
                getter.cancel()
        # The loop above stops as soon as the result is set; steps still queued go out before it.
        await asyncio.sleep(0)
        while not listener.empty():
            event = listener.get_nowait()
            if "step" in event:
                yield _sse("progress", {"id": job.id, **event})
        try:
            out = job.future.result()
        except Exception as exc:
            if isinstance(exc, ApiError):
                status, message = exc.status, exc.message
            else:
                status = status_for(exc) if isinstance(exc, EngineKitError) else 500
                message = one_line(exc)
            yield _sse("error", {"status": status, "error": state.scrub(message)})
            return
        yield _sse("done", {"id": job.id, **images_json(slot, out, generation_params(slot, req, out, image_to_image))})
    finally:
        if not job.future.done() and not job.cancel.is_set():  # the client left (a timeout is booked above)
            slot.cancel(job)
            state.metrics.rejections.labels(slot.name, "client_gone").inc()
        job.listeners.remove(listener)
