"""What a server is told: its limits and its models, checked once, before anything loads."""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from enginekit.errors import InputError

__all__ = ["ServeSettings", "PIXEL_FACTOR", "parse_model_pins", "parse_model_specs", "read_api_keys"]

#: A generation may ask for this many times the pixels its model was made for, by default:
#: twice the side (SD 1.5 at 1024x1024, SDXL at 2048x2048), or four images at the model's own
#: size. A denoiser's time and memory grow at least linearly with pixels (its attention,
#: quadratically), so one request stays within a few native generations' worth of work.
PIXEL_FACTOR = 4

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and switches of one server; every field has the CLI option of the same name."""

    #: Dynamic batching of classifiers: up to ``max_batch`` images per engine call, waiting at
    #: most ``max_delay_ms`` after the first for the rest (``max_batch=1`` turns batching off).
    max_batch: int = 8
    max_delay_ms: float = 5.0
    #: Requests waiting per model beyond which the server answers 503 at once.
    max_queue: int = 64
    #: A request not answered within this many seconds gets 504 and its work is cancelled.
    timeout_s: float = 30.0
    #: Bearer tokens; empty means no authentication.
    api_keys: frozenset[str] = frozenset()
    #: Origins allowed by CORS; empty means no CORS headers at all.
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 1024 * 1024
    #: Pixels one generation request may ask for (height x width x images); None: each model's
    #: own size (height x width it was made for) x :data:`PIXEL_FACTOR`. Checked before queueing.
    max_pixels: int | None = None
    #: Pixels of one uploaded image (checked from its header, before it is decoded).
    max_upload_pixels: int = 16_000_000
    max_images: int = 16
    max_prompt_chars: int = 2000
    max_steps: int = 150
    max_side: int = 2048
    #: Formats an upload may be in (Pillow's names).
    image_formats: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"})
    #: Warm every model up (one small run) before reporting ready.
    warmup: bool = True
    #: How long a drain (SIGTERM) waits for requests in flight before exiting anyway.
    drain_timeout_s: float = 60.0
    device: str = "auto"
    #: Pinned models: name -> the manifest digest (``sha256:HEX``) the artifact must have
    #: (``NAME=PATH@sha256:HEX``); a mismatch leaves that model not ready, with the reason.
    pins: dict = field(default_factory=dict)
    #: A public key (PEM) every served artifact's signature must verify with (``--verify-with``).
    verify_with: str | None = None
    #: Where the server listens, as it was told (A1111's ``/sdapi/v1/cmd-flags`` reports them);
    #: None when not known (an app built in process).
    host: str | None = None
    port: int | None = None
    extra: dict = field(default_factory=dict)
    #: The folder of LoRA files clients may name (``--lora-dir``; None: no LoRA at run time).
    lora_dir: str | None = None

    def __post_init__(self) -> None:
        ints = {"max_batch": (1, 4096), "max_queue": (1, 1_000_000), "max_body_bytes": (1024, 2**40),
                "max_upload_pixels": (1, 10**10), "max_images": (1, 1024), "max_prompt_chars": (1, 10**6),
                "max_steps": (1, 1000), "max_side": (8, 16384)}
        for name, (low, high) in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InputError(f"{name.replace('_', '-')} must be an integer from {low} to {high}, got {value!r}")
        if self.max_pixels is not None and (isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int)
                                            or not 64 <= self.max_pixels <= 10**10):
            raise InputError(f"max-pixels must be an integer from 64 to {10**10}, got {self.max_pixels!r}")
        for name in ("max_delay_ms", "timeout_s", "drain_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 86400:
                raise InputError(f"{name.replace('_', '-')} must be a number of 0 or more, got {value!r}")
        if self.timeout_s <= 0:
            raise InputError("timeout-s must be above 0")
        if self.port is not None and (isinstance(self.port, bool) or not isinstance(self.port, int)
                                      or not 0 <= self.port <= 65535):
            raise InputError(f"port must be an integer from 0 to 65535, got {self.port!r}")


_PIN = re.compile(r"@sha256:([^/@]*)$")


def _split_pin(text: str) -> tuple[str, str | None]:
    """``"out/x@sha256:HEX"`` -> ``("out/x", "sha256:hex")``; a path without a pin -> ``(path, None)``."""
    m = _PIN.search(text)
    if m is None:
        return text, None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", m.group(1)):
        raise InputError(f"{text!r}: a pin is @sha256: and the 64 hex digits `enginekit inspect` prints")
    return text[: m.start()], f"sha256:{m.group(1).lower()}"


def parse_model_pins(specs: Sequence[str | Path]) -> dict[str, str]:
    """The pins of ``NAME=PATH@sha256:HEX`` specs: model name -> ``sha256:hex``."""
    names = list(parse_model_specs(specs))
    pins = {}
    for name, spec in zip(names, specs):
        _, digest = _split_pin(str(spec))
        if digest is not None:
            pins[name] = digest
    return pins


def parse_model_specs(specs: Sequence[str | Path]) -> dict[str, Path]:
    """``["out/sd-ov", "clf=out/x@sha256:HEX"]`` -> ``{"sd-ov": Path("out/sd-ov"), "clf": Path("out/x")}``.

    A bare path is served under its folder's name; ``name=path`` chooses another; an
    ``@sha256:HEX`` suffix pins the artifact (see :func:`parse_model_pins`).
    """
    models: dict[str, Path] = {}
    for spec in specs:
        text, _ = _split_pin(str(spec))
        name, sep, path = text.partition("=")
        if not sep or "/" in name or not name:
            name, path = Path(text).resolve().name, text
        if not _NAME.match(name):
            raise InputError(f"model name {name!r}: use letters, digits, '.', '_' or '-' (up to 64), "
                             "or choose one with NAME=PATH")
        if name in models:
            raise InputError(f"two models are named {name!r}; name one with NAME=PATH")
        models[name] = Path(path)
    if not models:
        raise InputError("no artifacts to serve")
    return models


def read_api_keys(path: str | Path) -> frozenset[str]:
    """One key per line; blank lines and ``#`` comments are skipped."""
    try:
        mode = Path(path).stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            # Whoever can write the file can add a key (ssh's rule for its key files).
            raise InputError(f"--api-key-file {path}: group or others can write it; chmod 600 it")
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--api-key-file: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    keys = _keys(text.splitlines())
    if not keys:
        raise InputError("--api-key-file holds no key")
    return keys


def _keys(lines: Iterable[str]) -> frozenset[str]:
    out = set()
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            if any(c.isspace() for c in line):
                raise InputError("--api-key-file: a key may not contain spaces")
            out.add(line)
    return frozenset(out)
