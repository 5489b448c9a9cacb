"""``POST /v1/classify``: images in, the classifier's verdicts out (over the model's batcher),
with ``explain=true`` (or ``rollout``/``occlusion``) each verdict's map of where it came from."""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any, Callable

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from enginekit.serve.errors import ApiError
from enginekit.serve.models import CLASSIFIER, ModelSlot
from enginekit.serve.uploads import b64_image, json_body, open_image

__all__ = ["router", "classify_rows", "decode_images", "predictions", "explanations", "explained", "explain_field"]

router = APIRouter(tags=["tasks"])
#: Fields classify takes besides the images.
_FIELDS = ("top_k", "model", "embedding", "explain")
_TAKES = "classify takes images, top_k, model, embedding, explain"


def _state(request: Request) -> Any:
    return request.app.state.server


async def decode_images(state: Any, slot: ModelSlot, images: list[bytes]) -> np.ndarray:
    """Uploaded images to the classifier's preprocessed ``pixel_values`` (off the event loop)."""
    from enginekit.runtimes.preprocess import preprocess

    def work() -> np.ndarray:
        pil = [open_image(data, i, state.settings) for i, data in enumerate(images)]
        return preprocess(pil, slot.obj.preprocessing)

    return await asyncio.to_thread(work)


async def classify_rows(state: Any, slot: ModelSlot, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``pixels`` through the model's batcher: 503 when its queue is full, 504 past the timeout."""
    state.metrics.queue_depth.labels(slot.name).set(slot.depth)
    try:
        return await asyncio.wait_for(slot.batcher.submit(pixels), state.settings.timeout_s)
    except asyncio.TimeoutError:
        state.metrics.rejections.labels(slot.name, "timeout").inc()
        raise ApiError(504, f"model {slot.name!r} did not answer within {state.settings.timeout_s:g} s") from None
    except ApiError as exc:
        if exc.status == 503:
            state.metrics.rejections.labels(slot.name, "queue_full").inc()
        raise


def predictions(slot: ModelSlot, out: dict[str, np.ndarray], top_k: int, embedding: bool) -> list[dict[str, Any]]:
    from enginekit.runtimes.tasks.classifier import softmax

    probs = softmax(out["logits"])
    labels = slot.obj.labels
    k = min(top_k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    result = []
    for n, (row, idx) in enumerate(zip(probs, order)):
        best = int(idx[0])
        item: dict[str, Any] = {"label": labels[best], "index": best, "score": float(row[best]),
                                "top_k": [{"label": labels[int(i)], "score": float(row[int(i)])} for i in idx]}
        if embedding:
            item["embedding"] = out["embedding"][n].astype(float).tolist()
        result.append(item)
    return result


def _int_field(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(422, f"{name}: must be an integer from {low} to {high}, got {value!r}"[:200])
    return value


def _bool_field(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ApiError(422, f"{name}: must be true or false")


_CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "top_k": {"type": "integer", "minimum": 1}, "model": {"type": "string"}, "embedding": {"type": "boolean"},
        "explain": {"type": "string", "enum": ["true", "false", "rollout", "occlusion"]}}}},
    "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
        "top_k": {"type": "integer", "minimum": 1}, "model": {"type": "string"}, "embedding": {"type": "boolean"},
        "explain": {"type": "string", "enum": ["true", "false", "rollout", "occlusion"]}}}},
}}}


@router.post("/v1/classify", openapi_extra=_CLASSIFY_BODY)
async def classify(request: Request) -> JSONResponse:
    """Classify one or more images: multipart uploads (any file fields), or JSON
    ``{"images": [base64, ...]}``; ``top_k`` (5), ``model``, ``embedding`` (false), ``explain``
    (false; true or ``rollout``: attention rollout, ``occlusion``: occlusion map), also as a query
    parameter: each prediction then has an ``explanation`` (method, grid, box, overlay_png)."""
    state = _state(request)
    settings = state.settings
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=settings.max_images + 1, max_fields=32)
        fields: dict[str, Any] = {}
        images: list[bytes] = []
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                images.append(await value.read())
            elif key in _FIELDS:
                fields[key] = value
            else:
                raise ApiError(422, f"{key}: unknown field ({_TAKES})"[:200])
    elif ctype.startswith("application/json"):
        fields = await json_body(request)
        raw = fields.pop("images", fields.pop("image", None))
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            raise ApiError(422, "images: expected a list of base64 strings")
        if len(raw) > settings.max_images:
            raise ApiError(413, f"images: {len(raw)} images is over the limit of {settings.max_images} per request")
        images = [b64_image(v, f"images[{i}]") for i, v in enumerate(raw)]
        unknown = set(fields) - set(_FIELDS)
        if unknown:
            raise ApiError(422, f"{sorted(unknown)[0]}: unknown field ({_TAKES})"[:200])
    elif ctype.startswith("image/"):
        images, fields = [await request.body()], dict(request.query_params)
    else:
        raise ApiError(415, "send multipart/form-data (image files), application/json (base64 images) or one image/*")
    if not images:
        raise ApiError(422, "images: no image given")
    if len(images) > settings.max_images:
        raise ApiError(413, f"images: {len(images)} images is over the limit of {settings.max_images} per request")
    top_k = _int_field(fields.get("top_k", 5), "top_k", 1, 1000)
    embedding = _bool_field(fields.get("embedding", False), "embedding")
    # ?explain=true in the query works with every kind of body; a body field says the same.
    method = explain_field(fields.get("explain", request.query_params.get("explain", False)))
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(422, "model: expected a string")
    slot = state.pick(CLASSIFIER, model)
    request.state.model = slot.name
    if embedding and not getattr(slot.obj, "has_embedding", True):  # an imported engine: logits only
        raise ApiError(422, f"embedding: model {slot.name!r} outputs logits only (an imported engine)")
    pixels = await decode_images(state, slot, images)
    out = await classify_rows(state, slot, pixels)
    found = predictions(slot, out, top_k, embedding)
    if method is not None:
        for item, explanation in zip(found, await explanations(state, slot, images, method)):
            item["explanation"] = explanation
    return JSONResponse({"model": slot.name, "predictions": found})


# ---------------------------------------------------------------------------- explain

def explain_field(value: Any) -> str | None:
    """``explain``: false (none), true or ``rollout``, ``occlusion``."""
    if value is False or (isinstance(value, str) and value.lower() in ("false", "0", "")):
        return None
    if value is True or (isinstance(value, str) and value.lower() in ("true", "1", "rollout")):
        return "rollout"
    if isinstance(value, str) and value.lower() == "occlusion":
        return "occlusion"
    raise ApiError(422, "explain: must be true, false, rollout or occlusion")


#: One explanation at a time per model: rollout opens a second graph and holds every layer's
#: attention, occlusion runs the engine once per square; a second request meanwhile is told to retry.
_EXPLAINING: weakref.WeakKeyDictionary[ModelSlot, threading.Lock] = weakref.WeakKeyDictionary()


async def explanations(state: Any, slot: ModelSlot, images: list[bytes], method: str) -> list[dict[str, Any]]:
    """Each image's explanation as JSON (method, grid, box, base64 PNG overlay), off the event loop;
    503 while another runs for this model, 504 past the timeout."""
    return await explained(state, slot, images, method, lambda e, image: e.to_dict(image))


async def explained(state: Any, slot: ModelSlot, images: list[bytes], method: str,
                    shape: Callable[[Any, Any], Any]) -> list[Any]:
    """``shape(explanation, image)`` for each image, computed off the event loop; 503 while
    another explanation runs for this model, 504 past the timeout."""
    lock = _EXPLAINING.setdefault(slot, threading.Lock())
    if not lock.acquire(blocking=False):
        raise ApiError(503, f"model {slot.name!r} is explaining another request; retry later", {"Retry-After": "1"})

    def work() -> list[Any]:
        try:
            pil = [open_image(data, i, state.settings) for i, data in enumerate(images)]
            return [shape(e, image) for e, image in zip(slot.obj.explain(pil, method, top_k=1), pil)]
        finally:
            lock.release()

    try:
        return await asyncio.wait_for(asyncio.to_thread(work), state.settings.timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(504, f"model {slot.name!r} did not explain within {state.settings.timeout_s:g} s") from None

