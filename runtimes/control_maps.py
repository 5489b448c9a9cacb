"""Control maps made from a photo, for ControlNets (numpy and Pillow only, no OpenCV, no torch).

:func:`canny` is OpenCV's ``cv2.Canny(np.asarray(image), low, high)`` (aperture 3, L1 gradient),
pixel for pixel: what diffusers' ControlNet examples and A1111's ``canny`` preprocessor run on the
RGB image. Per pixel the channel with the largest gradient gives it (as OpenCV does for colour
images); 3x3 Sobel with replicated borders; non-maximum suppression across the gradient's
direction in OpenCV's four sectors, with its comparisons (strict on one side); pixels above
``high`` seed edges that grow 8-connected through pixels above ``low``. White edges on black, RGB,
the image's size. ``tests/runtimes/test_control_maps.py`` checks it against OpenCV.

:func:`parse_control_map` reads the CLI's and the server's spelling: ``none``, ``canny`` or
``canny:LOW,HIGH``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import numpy as np

from enginekit.errors import InputError

__all__ = ["canny", "parse_control_map", "CANNY_DEFAULTS"]

#: A1111's and diffusers' examples' thresholds.
CANNY_DEFAULTS = (100.0, 200.0)
_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)


def _gradients(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dy, |dx| + |dy|) of the channel with the largest magnitude at each pixel."""
    p = np.pad(rgb.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.abs(dx) + np.abs(dy)
    pick = np.argmax(mag, axis=2)[..., None]  # the first channel on a tie, as OpenCV
    return (np.take_along_axis(dx, pick, 2)[..., 0], np.take_along_axis(dy, pick, 2)[..., 0],
            np.take_along_axis(mag, pick, 2)[..., 0])


def canny(image: Any, low: float = CANNY_DEFAULTS[0], high: float = CANNY_DEFAULTS[1]) -> Any:
    """The Canny edge map of ``image`` (a PIL image, or an H x W (x C) uint8 array) as an RGB
    PIL image: ``cv2.Canny(image, low, high)``, white edges on black."""
    from PIL import Image

    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise InputError(f"canny takes a uint8 image, got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise InputError(f"canny takes an H x W or H x W x C image, got shape {array.shape}")
    low, high = float(low), float(high)
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high < 0:
        raise InputError(f"canny thresholds must be finite and not negative, got {low:g}, {high:g}")
    low_i, high_i = int(np.floor(min(low, high))), int(np.floor(max(low, high)))
    dx, dy, mag = _gradients(array)
    edges = _hysteresis(_suppressed(dx, dy, mag) & (mag > low_i), mag > high_i)
    return Image.fromarray(np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=2), "RGB")


def _suppressed(dx: np.ndarray, dy: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """Pixels that are a maximum across their gradient (OpenCV's sectors and comparisons;
    outside the image the magnitude is 0)."""
    p = np.pad(mag, 1)
    left, right, up, down = p[1:-1, :-2], p[1:-1, 2:], p[:-2, 1:-1], p[2:, 1:-1]
    ax, ay = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64)
    tg22x = ax * _TG22
    ys = ay << _SHIFT
    horizontal = ys < tg22x
    vertical = ~horizontal & (ys > tg22x + (ax << (_SHIFT + 1)))
    same_sign = (dx ^ dy) >= 0
    diagonal = np.where(same_sign, (mag > p[:-2, :-2]) & (mag > p[2:, 2:]), (mag > p[:-2, 2:]) & (mag > p[2:, :-2]))
    return np.where(horizontal, (mag > left) & (mag >= right),
                    np.where(vertical, (mag > up) & (mag >= down), diagonal))


def _hysteresis(candidate: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Candidates 8-connected, through candidates, to a strong candidate."""
    h, w = candidate.shape
    edges = np.zeros_like(candidate)
    seeds = np.flatnonzero(candidate & strong)
    edges.flat[seeds] = True
    todo = deque(seeds.tolist())
    cand = candidate.ravel()
    out = edges.ravel()
    while todo:
        i = todo.popleft()
        y, x = divmod(i, w)
        for ny in (y - 1, y, y + 1):
            if 0 <= ny < h:
                row = ny * w
                for nx in (x - 1, x, x + 1):
                    j = row + nx
                    if 0 <= nx < w and cand[j] and not out[j]:
                        out[j] = True
                        todo.append(j)
    return edges


def parse_control_map(spec: str | None, where: str = "control map") -> Callable[[Any], Any] | None:
    """``none`` (or empty): None; ``canny`` or ``canny:LOW,HIGH``: the function that makes that map."""
    text = (spec or "").strip()
    if text.lower() in ("", "none"):
        return None
    name, _, args = text.partition(":")
    if name.lower() != "canny":
        raise InputError(f"{where}: {text[:40]!r} is not a map enginekit makes (it makes: none, canny, "
                         "canny:LOW,HIGH); give the control image ready-made otherwise")
    low, high = CANNY_DEFAULTS
    if args:
        try:
            low, high = (float(v) for v in args.split(","))
        except ValueError:
            raise InputError(f"{where}: canny takes two thresholds, canny:LOW,HIGH (e.g. canny:100,200), "
                             f"got {args[:40]!r}") from None
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high < 0:
        raise InputError(f"{where}: canny thresholds must be finite and not negative, got {low:g}, {high:g}")
    return lambda image: canny(image, low, high)


def apply_control_maps(images: Any, specs: Any, where: str = "control_map") -> list[Any]:
    """Each control image (a path, PIL image or array) through its map: ``specs`` is one spelling
    for every image or one per image, in order; ``none`` passes the image through."""
    from enginekit.errors import ImageError
    from enginekit.runtimes.images import load_images

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    names = [specs] if isinstance(specs, str) else list(specs)
    if len(names) not in (1, len(items)):
        raise InputError(f"{where}: {len(names)} maps for {len(items)} control image(s); give one, or one each")
    makers = [parse_control_map(n, where) for n in names]
    makers = makers * len(items) if len(makers) == 1 else makers
    if all(m is None for m in makers):
        return items
    try:
        loaded = load_images(items)
    except ImageError as exc:
        raise InputError(f"control_image: {exc}") from None
    return [image if make is None else make(image) for image, make in zip(loaded, makers)]
