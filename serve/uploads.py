"""Images uploaded to the server (base64 fields and files): checked from the header before
anything is decoded, each error one line naming the field."""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from typing import Any

from enginekit.errors import ImageError
from enginekit.serve.errors import ApiError

__all__ = ["b64_image", "check_image", "json_body", "open_image"]


def b64_image(value: Any, field: str) -> bytes:
    """Base64 (optionally a ``data:`` URL) to bytes; anything else is a 422 naming ``field``."""
    if not isinstance(value, str) or not value:
        raise ApiError(422, f"{field}: expected a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field}: not valid base64") from None


def check_image(data: bytes, index: int, settings: Any, field: str | None = None) -> None:
    """Format and pixel count from the header alone, before anything is decoded (errors name
    ``field``, else "image <index>")."""
    from PIL import Image

    formats = settings.image_formats
    label = field or f"image {index}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, f"{label}: too many pixels (the limit is {settings.max_upload_pixels})") from None
    except Exception:
        raise ApiError(415, f"{label}: not an image in a supported format ({', '.join(sorted(formats))})") from None
    if fmt not in formats:
        raise ApiError(415, f"{label}: {fmt} is not accepted (send one of {', '.join(sorted(formats))})")
    if w * h > settings.max_upload_pixels:
        raise ApiError(413, f"{label}: {w}x{h} is over the limit of {settings.max_upload_pixels} pixels")


def open_image(data: bytes, index: int, settings: Any, field: str | None = None) -> Any:
    from enginekit.runtimes.images import load_images

    check_image(data, index, settings, field)
    try:
        return load_images([data])[0]
    except ImageError as exc:
        raise ApiError(422, f"{field or f'image {index}'}: {str(exc).partition(': ')[2] or exc}") from None


async def json_body(request: Any) -> dict[str, Any]:
    """The request's body as a JSON object; anything else is a 422."""
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(422, "body: not valid JSON") from None
    except RecursionError:  # the C parser recurses per level: a hostile nesting, not a server fault
        raise ApiError(422, "body: JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(422, "body: expected a JSON object")
    return body
