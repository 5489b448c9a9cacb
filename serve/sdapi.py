"""The AUTOMATIC1111 / SD.Next API (``/sdapi/v1/...``) for the fields it shares with
``/v1/generate``, so the Krita and Photoshop plug-ins and scripts written for those
UIs can drive a pipeline here. Fields we do not run (hires fix, restore faces, ...)
are accepted and ignored, as A1111 itself ignores what a script does not use."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import replace
import time
from typing import Any, Optional

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from enginekit.runtimes.png_info import A1111_SAMPLERS as SAMPLERS
from enginekit.serve.loras import take_prompt_tags
from enginekit.serve.errors import ApiError
from enginekit.serve.models import PIPELINE
from enginekit.serve.sdapi_info import current_checkpoint, resolve_checkpoint
from enginekit.serve.tasks import (GenerateRequest, decode_controls, generation_params, images_json, png_bytes,
                                   run_generation)
from enginekit.serve.uploads import b64_image, open_image

__all__ = ["router", "SAMPLERS"]

router = APIRouter(tags=["A1111 API"])


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
    prompt, tags = take_prompt_tags(body.prompt)  # A1111's <lora:NAME:WEIGHT>, applied, not prompted
    fields: dict[str, Any] = {"prompt": prompt, "negative_prompt": body.negative_prompt or None, "loras": tags or None,
                              "steps": body.steps, "guidance": body.cfg_scale, "seed": body.seed,
                              "width": body.width, "height": body.height, "scheduler": scheduler,
                              "num_images": body.batch_size * body.n_iter}
    if isinstance(body, Img2ImgRequest):
        fields["strength"] = body.denoising_strength
    from enginekit.serve.sdapi_controlnet import controlnet_units

    units = controlnet_units(body)
    if units:  # A1111's ControlNet units: images decoded by the route, values here (one per unit)
        fields["control_image"] = [u[0] for u in units]
        for k, key in enumerate(("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end",
                                 "control_map"), 1):
            fields[key] = [u[k] for u in units]
    return GenerateRequest.checked(fields, settings)


def _model(request: Request, body: Txt2ImgRequest) -> Any:
    """The model a request runs: ``override_settings.sd_model_checkpoint`` (a name, title or
    hash), else the current one (``POST /sdapi/v1/options``, else the first pipeline served)."""
    state = _state(request)
    name = (body.override_settings or {}).get("sd_model_checkpoint")
    if name is not None and not isinstance(name, str):
        raise ApiError(422, "override_settings.sd_model_checkpoint: expected a model name")
    name = (resolve_checkpoint(state, name) or name) if name else current_checkpoint(state)
    slot = state.pick(PIPELINE, name, field="override_settings.sd_model_checkpoint")
    request.state.model = slot.name
    return slot


def _answer(slot: Any, body: Txt2ImgRequest, req: GenerateRequest, out: Any) -> dict[str, Any]:
    # What ran, with the model's own values where the request left one unset; each PNG carries it.
    params = generation_params(slot, req, out, isinstance(body, Img2ImgRequest))
    params = replace(params, prompt=body.prompt)  # A1111's infotext keeps the <lora:...> tags
    result = images_json(slot, out, params)
    info = {"prompt": body.prompt, "negative_prompt": req.negative_prompt or "", "seed": out.seed,
            "all_seeds": [out.seed] * len(out.images), "steps": params.steps, "cfg_scale": params.cfg_scale,
            "sampler_name": body.sampler_name or body.sampler_index, "width": params.width,
            "height": params.height, "sd_model_name": slot.name, "sd_model_hash": params.model_hash,
            "infotexts": [params.at(i).infotext() for i in range(len(out.images))]}
    if isinstance(body, Img2ImgRequest):
        info["denoising_strength"] = params.denoising_strength
    fields = body.model_dump(exclude={"init_images", "mask"})
    return {"images": result["images"], "parameters": fields, "info": json.dumps(info)}


@router.post("/sdapi/v1/txt2img")
async def txt2img(request: Request, body: Txt2ImgRequest) -> dict[str, Any]:
    slot = _model(request, body)
    req = _ours(body, _state(request).settings)
    await decode_controls(req, _state(request).settings)
    out = await run_generation(request, slot, req)
    return _answer(slot, body, req, out)


@router.post("/sdapi/v1/img2img")
async def img2img(request: Request, body: Img2ImgRequest) -> dict[str, Any]:
    slot = _model(request, body)
    state = _state(request)
    req = _ours(body, state.settings)
    await decode_controls(req, state.settings)
    init = await asyncio.to_thread(open_image, b64_image(body.init_images[0], "init_images[0]"), 0, state.settings)
    if body.mask is not None:
        from enginekit.serve.sdapi_inpaint import prepare_inpainting

        mask = await asyncio.to_thread(open_image, b64_image(body.mask, "mask"), 1, state.settings, "mask")
        init, req._mask, req.padding_mask_crop = await asyncio.to_thread(prepare_inpainting, body, init, mask)
    out = await run_generation(request, slot, req, init)
    return _answer(slot, body, req, out)


@router.get("/sdapi/v1/progress")
async def progress(request: Request, skip_current_image: bool = Query(False)) -> dict[str, Any]:
    """Progress of the generation running now (A1111's shape). Unless ``skip_current_image``,
    ``current_image`` is a PNG (base64) of its latents after the last step, mapped to RGB
    without the VAE (null before the first step, or for a VAE we have no map for)."""
    state = _state(request)
    running, running_slot, queued = None, None, 0
    for slot in state.slots.values():
        if slot.jobs is not None:
            queued += slot.jobs.depth
            if slot.jobs.current is not None and running is None:
                running, running_slot = slot.jobs.current, slot
    fraction, eta = 0.0, 0.0
    if running is not None and running.steps:
        fraction = running.step / running.steps
        elapsed = time.monotonic() - running.started
        eta = elapsed / fraction * (1 - fraction) if fraction > 0 else 0.0
    image = None
    if running is not None and not skip_current_image and running.latents is not None:
        image = await asyncio.to_thread(_preview, running_slot, running)
    return {"progress": fraction, "eta_relative": eta, "current_image": image, "textinfo": None,
            "state": {"skipped": False, "interrupted": bool(running and running.cancel.is_set()),
                      "job": running.id if running else "", "job_count": queued + (1 if running else 0),
                      "job_timestamp": "0", "job_no": 0,
                      "sampling_step": running.step if running else 0,
                      "sampling_steps": running.steps if running else 0}}


def _preview(slot: Any, job: Any) -> str | None:
    """A PNG (base64) of ``job``'s latents now: made only when asked for, off the event loop."""
    from PIL import Image

    from enginekit.runtimes.tasks.preview import preview_rgb

    latents, made = job.latents, job.preview
    if made is not None and made[0] is latents:
        return made[1]
    kwargs = job.kwargs
    init = kwargs.get("image")
    size = slot.obj.config.default_size
    height = kwargs.get("height") or (init.height if init is not None else size)
    width = kwargs.get("width") or (init.width if init is not None else size)
    rgb = preview_rgb(slot.obj, latents, height, width)
    image = None if rgb is None else base64.b64encode(png_bytes(Image.fromarray(rgb))).decode("ascii")
    job.preview = (latents, image)
    return image


@router.post("/sdapi/v1/interrupt")
@router.post("/sdapi/v1/skip")
async def interrupt(request: Request) -> dict[str, Any]:
    """Stop the generations running now (their requests answer with an error). ``skip`` is
    the same here: a batch's images come from one engine call, so there is no next image to
    go on with."""
    stopped = []
    for slot in _state(request).slots.values():
        job = slot.jobs.cancel_current() if slot.jobs is not None else None
        if job is not None:
            slot.cancel(job)
            stopped.append(slot.name)
    return {"interrupted": stopped}
