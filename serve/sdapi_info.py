"""What A1111 clients ask before and beside generating: the options (and switching the
current model), the lists (models, samplers, schedulers, LoRAs, upscalers, embeddings),
the command-line flags, a ping, and the generation parameters an image carries (png-info).

The current model is per server process: ``POST /sdapi/v1/options`` switches it in the
process that answers, so behind ``--workers N`` or Ray replicas a client names its model
per request (``override_settings.sd_model_checkpoint``) instead.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, ConfigDict, Field

from enginekit.runtimes.png_info import A1111_SAMPLERS, parse_infotext, read_image_info
from enginekit.serve.errors import ApiError
from enginekit.serve.models import PIPELINE, ModelSlot
from enginekit.serve.uploads import b64_image, check_image

__all__ = ["router", "current_checkpoint", "resolve_checkpoint"]

router = APIRouter(tags=["A1111 API"])

#: Options we report and the values we run; a POST may repeat them but not change them.
_FIXED: dict[str, Any] = {"samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
                          "sd_vae": "Automatic", "enable_pnginfo": True, "live_previews_enable": True,
                          "show_progress_type": "Approx cheap"}
#: Other values a POST may give for a fixed option: A1111's "None" VAE is the checkpoint's own.
_SAME = {"sd_vae": ("Automatic", "None")}
_TYPES = {"sd_model_checkpoint": str, "sd_checkpoint_hash": str, **{k: type(v) for k, v in _FIXED.items()}}

#: A1111 1.9+'s schedule types that our samplers take (Karras: DPM++ 2M's Karras sigmas).
SCHEDULERS = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
               "need_inner_model": False},
              {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]


def _state(request: Request) -> Any:
    return request.app.state.server


def _a1111_slots(state: Any) -> list[ModelSlot]:
    return [s for s in state.slots.values() if s.served is not None and s.served.a1111]


def _hash(slot: ModelSlot) -> str | None:
    return slot.digest[:10] if slot.digest else None


def current_checkpoint(state: Any) -> str | None:
    """A1111's current model: the one ``POST /sdapi/v1/options`` chose, else the first pipeline served."""
    chosen = state.defaults.get(PIPELINE)
    if chosen:
        return chosen
    return next((s.name for s in state.slots.values() if s.serves(PIPELINE)), None)


def resolve_checkpoint(state: Any, value: str) -> str | None:
    """The served model ``value`` names, as A1111's checkpoint aliases do: its name, title
    (``name [hash]``), short hash or sha256; None when none matches."""
    for slot in _a1111_slots(state):
        short = _hash(slot)
        if value in (slot.name, f"{slot.name} [{short}]", short, slot.digest):
            return slot.name
    return None


def _options(state: Any) -> dict[str, Any]:
    name = current_checkpoint(state)
    slot = state.slots.get(name) if name else None
    return {"sd_model_checkpoint": name, "sd_checkpoint_hash": slot.digest if slot is not None else None, **_FIXED}


@router.get("/sdapi/v1/options")
async def get_options(request: Request) -> dict[str, Any]:
    """A1111's options that describe this server; ``sd_model_checkpoint`` is the current model."""
    return _options(_state(request))


@router.post("/sdapi/v1/options")
async def set_options(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Switch the current model (``sd_model_checkpoint``: a served pipeline's name, title or
    hash). Other options A1111 has are accepted and ignored, as A1111 ignores what it does
    not know; an option we report must have its type, and a fixed one its value."""
    state = _state(request)
    for key, value in body.items():
        want = _TYPES.get(key)
        if want is None:
            continue
        if type(value) is not want:  # noqa: E721 - a bool is not an int here
            raise ApiError(422, f"{key}: expected {want.__name__}, got {type(value).__name__}")
        if key in _FIXED and value != _FIXED[key] and value not in _SAME.get(key, ()):
            raise ApiError(422, f"{key}: this server runs {_FIXED[key]!r} only, got {value!r}"[:300])
    name = body.get("sd_model_checkpoint")
    if name is not None:
        found = resolve_checkpoint(state, name)
        if found is None:
            served = ", ".join(s.name for s in _a1111_slots(state)) or "none"
            raise ApiError(422, f"sd_model_checkpoint: no served pipeline is named {name!r} (served: {served})"[:300])
        state.defaults[PIPELINE] = found
    return _options(state)


@router.get("/sdapi/v1/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    """The pipelines served; ``hash`` is the first 10 hex digits of the artifact's manifest sha256."""
    return [{"title": s.name, "model_name": s.name, "hash": _hash(s), "sha256": s.digest, "filename": s.name,
             "config": None} for s in _a1111_slots(_state(request))]


@router.get("/sdapi/v1/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [ours], "options": {}} for name, ours in A1111_SAMPLERS.items()]


@router.get("/sdapi/v1/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    """A1111 1.9+'s schedule types we take: Automatic (the sampler's own), Karras (DPM++ 2M)."""
    return SCHEDULERS


@router.get("/sdapi/v1/loras")
async def loras(request: Request) -> list[dict[str, Any]]:
    """The LoRA files of the server's ``--lora-dir`` (A1111's name, alias, path, metadata); none without one."""
    from enginekit.serve.loras import list_loras

    return list_loras(_state(request).settings)


@router.get("/sdapi/v1/upscalers")
async def upscalers() -> list[dict[str, Any]]:
    """A1111's "None" upscaler only: no upscaling model is served."""
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


@router.get("/sdapi/v1/embeddings")
async def embeddings() -> dict[str, Any]:
    """No textual-inversion embeddings are loaded."""
    return {"loaded": {}, "skipped": {}}


@router.get("/sdapi/v1/cmd-flags")
async def cmd_flags(request: Request) -> dict[str, Any]:
    """The flags that describe this server, under A1111's names where it has one."""
    from enginekit import __version__

    settings = _state(request).settings
    host = settings.host
    return {"api": True, "nowebui": True, "listen": host is not None and host not in ("127.0.0.1", "localhost", "::1"),
            "server_name": host, "port": settings.port, "api_auth": None, "api_log": False,
            "cors_allow_origins": ",".join(settings.cors_origins) or None, "cors_allow_origins_regex": None,
            "api_server_stop": False, "enginekit_version": __version__, "enginekit_api_keys": bool(settings.api_keys)}


@router.get("/internal/ping")
async def ping() -> dict[str, Any]:
    return {}


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    image: str = Field(description="base64 of the image (or a data: URL)")


@router.post("/sdapi/v1/png-info")
async def png_info(request: Request, body: PngInfoRequest) -> dict[str, Any]:
    """The generation parameters an image carries (a PNG's ``parameters`` chunk, a JPEG's or
    WebP's EXIF UserComment): ``info`` the text, ``items`` the other text chunks,
    ``parameters`` the text parsed as A1111 parses it."""
    data = b64_image(body.image, "image")
    settings = _state(request).settings

    def read() -> tuple[str | None, dict[str, str]]:
        from PIL import Image

        check_image(data, 0, settings)  # format and pixels from the header, before anything is decoded
        with Image.open(io.BytesIO(data)) as image:  # text chunks and EXIF come with the header
            return read_image_info(image)

    text, items = await asyncio.to_thread(read)
    return {"info": text or "", "items": items, "parameters": parse_infotext(text) if text else {}}
