"""Checks of a pipeline call's arguments: each wrong value is a one-line :class:`InputError`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from enginekit.errors import InputError

__all__ = ["CallArgs", "or_default", "as_prompts", "int_in", "float_in", "check_latents"]


@dataclass(frozen=True)
class CallArgs:
    """A pipeline call's arguments as given (unchecked; None: the manifest's default), under
    the names of ``TextToImage.__call__``'s keywords."""

    prompt: Any
    negative_prompt: Any = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    num_images_per_prompt: int = 1
    seed: int | None = None
    latents: np.ndarray | None = None
    image: Any = None
    strength: float = 0.8
    scheduler: str | None = None
    guidance_rescale: float = 0.0
    output_type: str = "pil"
    generator: np.random.Generator | None = None
    max_sequence_length: int | None = None
    true_cfg_scale: float = 1.0


def or_default(value: Any, default: Any) -> Any:
    """``value``, or ``default`` where the caller left it unset (None; 0 is a value)."""
    return default if value is None else value


def as_prompts(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise InputError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}")


def int_in(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {value}")
    return int(value)


def float_in(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise InputError(f"{name} must be between {low:g} and {high:g}, got {value}")
    return value


def check_latents(latents: np.ndarray | None, shape: tuple[int, ...], height: int, width: int) -> np.ndarray | None:
    """The caller's initial latents, which must have ``shape`` and be finite."""
    if latents is None:
        return None
    latents = np.asarray(latents)
    if latents.shape != shape:
        raise InputError(f"latents must have shape {shape} for {shape[0]} image(s) at {height}x{width}, "
                         f"got {tuple(latents.shape)}")
    if not np.isfinite(latents).all():
        raise InputError("latents hold NaN or infinite values")
    return latents
