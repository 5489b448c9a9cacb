"""The AUTOMATIC1111 / SD.Next API (``/sdapi/v1/...``) for the fields it shares with
``/v1/generate``, so the Krita and Photoshop plug-ins and scripts written for those
UIs can drive a pipeline here. Fields we do not run (hires fix, restore faces, ...)
are accepted and ignored, as A1111 itself ignores what a script does not use."""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from enginekit.serve.errors import ApiError
from enginekit.serve.models import PIPELINE
from enginekit.serve.tasks import GenerateRequest, b64_image, images_json, open_image, run_generation

__all__ = ["router", "SAMPLERS"]

router = APIRouter(tags=["A1111 API"])

#: A1111 sampler names -> our schedulers.
SAMPLERS = {"Euler": "euler", "Euler a": "euler-a", "DDIM": "ddim", "DPM++ 2M": "dpm++2m",
            "DPM++ 2M Karras": "dpm++2m-karras", "LCM": "lcm"}


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = Field(default="", max_length=100_000)
    negative_prompt: str = Field(default="", max_length=100_000)
    steps: Optional[int] = Field(default=None, ge=1, le=1000, description="absent: the model's own default")
    cfg_scale: Optional[float] = Field(default=None, ge=0.0, le=30.0, description="absent: the model's own default")
    seed: int = Field(default=-1, ge=-1, le=2**63 - 1)
    width: Optional[int] = Field(default=None, ge=8, le=16384)
    height: Optional[int] = Field(default=None, ge=8, le=16384)
    sampler_name: Optional[str] = Field(default=None, max_length=100)
    sampler_index: Optional[str] = Field(default=None, max_length=100)
    scheduler: Optional[str] = Field(default=None, max_length=100)
    batch_size: int = Field(default=1, ge=1, le=1024)
    n_iter: int = Field(default=1, ge=1, le=1024)
    override_settings: Optional[dict] = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(min_length=1, max_length=1)
    denoising_strength: float = Field(default=0.75, gt=0.0, le=1.0)
    # Inpainting (serve/sdapi_inpaint.py): A1111's names and defaults.
    mask: Optional[str] = Field(default=None, description="base64 mask: white is repainted")
    mask_blur: Optional[int] = Field(default=None, ge=0, le=256, description="absent: 4")
    inpainting_fill: int = Field(default=0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(default=0, ge=0, le=16384)
    inpainting_mask_invert: int = Field(default=0, ge=0, le=1)


def _state(request: Request) -> Any:
    return request.app.state.server


def _ours(body: Txt2ImgRequest, settings: Any) -> GenerateRequest:
    sampler = body.sampler_name or body.sampler_index
    scheduler = None
    if sampler:
        if sampler in SAMPLERS:
            scheduler = SAMPLERS[sampler]
        elif sampler.lower() in SAMPLERS.values():
            scheduler = sampler.lower()
        else:
            raise ApiError(422, f"sampler_name: {sampler!r} is not one of {', '.join(SAMPLERS)}"[:300])
    if body.scheduler and body.scheduler.lower() not in ("automatic", "karras") and not sampler:
        raise ApiError(422, f"scheduler: {body.scheduler!r} is not supported; choose a sampler_name")
    if scheduler == "dpm++2m" and (body.scheduler or "").lower() == "karras":
        scheduler = "dpm++2m-karras"
    fields: dict[str, Any] = {"prompt": body.prompt, "negative_prompt": body.negative_prompt or None,
                              "steps": body.steps, "guidance": body.cfg_scale, "seed": body.seed,
                              "width": body.width, "height": body.height, "scheduler": scheduler,
                              "num_images": body.batch_size * body.n_iter}
    if isinstance(body, Img2ImgRequest):
        fields["strength"] = body.denoising_strength
    return GenerateRequest.checked(fields, settings)


def _model(request: Request, body: Txt2ImgRequest) -> Any:
    name = (body.override_settings or {}).get("sd_model_checkpoint")
    if name is not None and not isinstance(name, str):
        raise ApiError(422, "override_settings.sd_model_checkpoint: expected a model name")
    slot = _state(request).pick(PIPELINE, name, field="override_settings.sd_model_checkpoint")
    request.state.model = slot.name
    return slot


def _answer(slot: Any, body: Txt2ImgRequest, req: GenerateRequest, out: Any) -> dict[str, Any]:
    result = images_json(slot, out)
    config = slot.obj.config  # what ran where the request left a value to the model
    steps = req.steps if req.steps is not None else config.default_steps
    guidance = req.guidance if req.guidance is not None else config.default_guidance_scale
    info = {"prompt": req.prompt, "negative_prompt": req.negative_prompt or "", "seed": out.seed,
            "all_seeds": [out.seed] * len(out.images), "steps": steps, "cfg_scale": guidance,
            "sampler_name": body.sampler_name or body.sampler_index, "width": out.images[0].width,
            "height": out.images[0].height, "sd_model_name": slot.name}
    params = body.model_dump(exclude={"init_images", "mask"})
    return {"images": result["images"], "parameters": params, "info": json.dumps(info)}


@router.post("/sdapi/v1/txt2img")
async def txt2img(request: Request, body: Txt2ImgRequest) -> dict[str, Any]:
    slot = _model(request, body)
    req = _ours(body, _state(request).settings)
    out = await run_generation(request, slot, req)
    return _answer(slot, body, req, out)


@router.post("/sdapi/v1/img2img")
async def img2img(request: Request, body: Img2ImgRequest) -> dict[str, Any]:
    import asyncio

    slot = _model(request, body)
    state = _state(request)
    req = _ours(body, state.settings)
    init = await asyncio.to_thread(open_image, b64_image(body.init_images[0], "init_images[0]"), 0, state.settings)
    if body.mask is not None:
        from enginekit.serve.sdapi_inpaint import prepare_inpainting

        mask = await asyncio.to_thread(open_image, b64_image(body.mask, "mask"), 1, state.settings, "mask")
        init, req._mask, req.padding_mask_crop = await asyncio.to_thread(prepare_inpainting, body, init, mask)
    out = await run_generation(request, slot, req, init)
    return _answer(slot, body, req, out)


@router.get("/sdapi/v1/progress")
async def progress(request: Request) -> dict[str, Any]:
    """Progress of the generation running now (A1111's shape; ``current_image`` is never sent)."""
    state = _state(request)
    running, queued = None, 0
    for slot in state.slots.values():
        if slot.jobs is not None:
            queued += slot.jobs.depth
            if slot.jobs.current is not None and running is None:
                running = slot.jobs.current
    fraction, eta = 0.0, 0.0
    if running is not None and running.steps:
        fraction = running.step / running.steps
        elapsed = time.monotonic() - running.started
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else 0.0
    return {"progress": fraction, "eta_relative": eta, "current_image": None, "textinfo": None,
            "state": {"skipped": False, "interrupted": bool(running and running.cancel.is_set()),
                      "job": running.id if running else "", "job_count": queued + (1 if running else 0),
                      "job_timestamp": "0", "job_no": 0,
                      "sampling_step": running.step if running else 0,
                      "sampling_steps": running.steps if running else 0}}


@router.post("/sdapi/v1/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    """Stop the generations running now (their requests answer with an error)."""
    stopped = []
    for slot in _state(request).slots.values():
        job = slot.jobs.cancel_current() if slot.jobs is not None else None
        if job is not None:
            slot.cancel(job)
            stopped.append(slot.name)
    return {"interrupted": stopped}


@router.get("/sdapi/v1/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    return [{"title": s.name, "model_name": s.name, "hash": None, "sha256": None, "filename": s.name, "config": None}
            for s in _state(request).slots.values() if s.served is not None and s.served.a1111]


@router.get("/sdapi/v1/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [ours], "options": {}} for name, ours in SAMPLERS.items()]
