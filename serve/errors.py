"""Errors the server answers with: always JSON ``{"error": message}``, never a 500,
never a file system path."""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from enginekit.errors import EngineKitError, ImageError, InputError

__all__ = ["ApiError", "QueueFull", "status_for", "scrub"]


class ApiError(Exception):
    """An HTTP answer other than success: status, a one-line message, extra headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class QueueFull(ApiError):
    def __init__(self, model: str, retry_after: int = 1) -> None:
        super().__init__(503, f"model {model!r} is busy: its queue is full; retry later",
                         {"Retry-After": str(retry_after)})


def status_for(exc: EngineKitError) -> int:
    """Bad input is the client's (422; an unreadable image 415, too many pixels 413)."""
    if isinstance(exc, ImageError):
        text = str(exc)
        return 413 if "pixels" in text else 415
    if isinstance(exc, InputError):
        return 422
    return 400


_ABS_PATH = re.compile(r"(?<![\w.])(?:/[\w.@+-]+){2,}/?")


def scrub(message: str, known: Iterable[tuple[str, str]] = ()) -> str:
    """``message`` without file system paths: known roots become their model's name,
    any other absolute path its last part."""
    for path, name in sorted(known, key=lambda kv: -len(kv[0])):
        if path:
            message = message.replace(path, name)
    return _ABS_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)
