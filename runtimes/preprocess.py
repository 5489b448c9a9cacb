"""Eval-time image preprocessing that reproduces timm's and transformers' transforms.

A :class:`Preprocessing` travels in ``manifest.json`` under ``"preprocessing"``
and says exactly what the model's own library did to an image before the
forward pass; :func:`preprocess` replays it with Pillow and numpy only, so an
edge box gets the same pixels without torch:

1. convert to RGB (dropping alpha like timm's loader, or compositing it onto
   a background like transformers' ``convert_to_rgb``);
2. resize with ``PIL.Image.resize`` (what torchvision does to a PIL image, and
   what transformers' PIL backend does), or, with ``resize_kernel="torchvision"``,
   with a numpy port of torchvision's antialiased uint8 tensor resize (what
   transformers 5's default, torchvision-backed image processors do: the same
   filters as Pillow, in 15-bit instead of 22-bit fixed point, so results differ
   from Pillow's by a uint8 level in places);
3. center crop to the model input size, padding first where the image is
   smaller;
4. rescale and normalize in float32, in the libraries' order of operations.

Steps 3-4 run on uint8 pixels through a per-channel lookup table: exact, and
faster than float arithmetic on the whole image.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from enginekit.errors import ImageError, ManifestError

__all__ = [
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "CROP_OFFSETS",
    "SOURCES",
    "RESIZE_KERNELS",
    "Preprocessing",
    "preprocess",
    "resized_size",
    "view_box",
]

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
#: ``shortest_edge``: torchvision ``Resize(int, max_size)``; ``resize_size`` is ``(edge,)``.
#: ``exact``: to ``resize_size == (height, width)``, aspect ratio not kept.
#: ``keep_ratio``: timm ``ResizeKeepRatio(resize_size, longest)``, sides rounded.
#: ``none``: no resize; ``resize_size`` is ``()``.
RESIZE_MODES = ("shortest_edge", "exact", "keep_ratio", "none")
#: ``round``: torchvision ``CenterCrop`` (``int(round(d / 2.0))``, padding
#: puts the odd pixel after). ``floor``: transformers (``d // 2``, padding puts
#: the odd pixel before). ``floor_after``: transformers' torchvision backend (``d // 2``,
#: padding puts the odd pixel after).
CROP_OFFSETS = ("round", "floor", "floor_after")
SOURCES = ("timm", "transformers", "custom")
#: ``pil``: ``PIL.Image.resize``. ``torchvision``: ``torchvision.transforms.v2.functional.resize``
#: of a uint8 tensor with ``antialias=True`` (bilinear and bicubic), bit for bit.
RESIZE_KERNELS = ("pil", "torchvision")
#: Largest side a manifest may ask for: 8192 x 8192 x 3 float32 is 768 MiB per image,
#: already far past any classifier's input; a typo such as 100000 would ask for 112 GiB.
MAX_SIDE = 8192


@dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing of an image classifier, exact enough to match its library.

    ``size`` is the model input ``(height, width)``. ``mean``/``std`` are
    ``None`` when the model takes unnormalized pixels, ``rescale_factor`` is
    ``None`` when pixels stay in 0..255. ``alpha_background`` is ``None`` to
    drop alpha (``Image.convert("RGB")``, timm) or an RGB colour to composite
    transparent images onto (transformers uses white). ``pad_fill`` is the
    uint8 colour of padding when the crop is larger than the resized image.
    """

    size: tuple[int, int]
    resize: str
    resize_size: tuple[int, ...]
    interpolation: str
    center_crop: bool
    rescale_factor: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    resize_max_size: int | None = None
    resize_longest: float = 0.0
    crop_offset: str = "round"
    pad_fill: tuple[int, int, int] = (0, 0, 0)
    convert_rgb: bool = True
    alpha_background: tuple[int, int, int] | None = None
    source: str = "custom"
    resize_kernel: str = "pil"

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:  # lists (as from JSON) become tuples: hashable, comparable
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        # Raised as ValueError naming the field; from_dict turns it into a ManifestError.
        _check_ints("size", self.size, 2, maximum=MAX_SIDE)
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"preprocessing.resize: {self.resize!r} is not one of {RESIZE_MODES}")
        wanted = {"shortest_edge": 1, "exact": 2, "keep_ratio": 2, "none": 0}[self.resize]
        _check_ints("resize_size", self.resize_size, wanted, maximum=MAX_SIDE)
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"preprocessing.interpolation: {self.interpolation!r} is not one of {tuple(INTERPOLATIONS)}"
            )
        if self.crop_offset not in CROP_OFFSETS:
            raise ValueError(f"preprocessing.crop_offset: {self.crop_offset!r} is not one of {CROP_OFFSETS}")
        if self.resize_kernel not in RESIZE_KERNELS:
            raise ValueError(f"preprocessing.resize_kernel: {self.resize_kernel!r} is not one of {RESIZE_KERNELS}")
        if self.resize_kernel == "torchvision" and self.interpolation not in _TV_FILTERS:
            raise ValueError(f"preprocessing.resize_kernel: torchvision is replayed for {', '.join(_TV_FILTERS)} "
                             f"only, not {self.interpolation!r}")
        if self.source not in SOURCES:
            raise ValueError(f"preprocessing.source: {self.source!r} is not one of {SOURCES}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("preprocessing.mean/std: give both or neither")
        if self.mean is not None:
            _check_floats("mean", self.mean)
            _check_floats("std", self.std)
            if any(s == 0 for s in self.std):
                raise ValueError("preprocessing.std: a standard deviation of 0 divides by zero")
        if self.rescale_factor is not None:
            _check_floats("rescale_factor", (self.rescale_factor,), length=1)
        for name in ("center_crop", "convert_rgb"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"preprocessing.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.resize_max_size is not None:
            _check_ints("resize_max_size", (self.resize_max_size,), 1, maximum=MAX_SIDE)
            if self.resize != "shortest_edge" or self.resize_max_size <= self.resize_size[0]:
                raise ValueError("preprocessing.resize_max_size: only for 'shortest_edge', and above its edge")
        if not self.center_crop and not (self.resize == "exact" and self.resize_size == self.size):
            # Without a crop the output size would follow the input size.
            raise ValueError("preprocessing.center_crop: must be true unless resize is 'exact' to size")
        _check_floats("resize_longest", (self.resize_longest,), length=1)
        if not 0.0 <= self.resize_longest <= 1.0:
            raise ValueError("preprocessing.resize_longest: must lie in [0, 1]")
        _check_ints("pad_fill", self.pad_fill, 3, minimum=0, maximum=255)
        if self.alpha_background is not None:
            _check_ints("alpha_background", self.alpha_background, 3, minimum=0, maximum=255)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for ``manifest.json`` (tuples become lists); the default ``resize_kernel``
        is left out, so manifests written before it existed read (and hash) the same."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if out["resize_kernel"] == "pil":
            del out["resize_kernel"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Parse :meth:`to_dict` output; a missing, unknown or bad field is a ManifestError."""
        if not isinstance(data, Mapping):
            raise ManifestError("manifest.json preprocessing: expected a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ManifestError(f"manifest.json preprocessing: unknown field {unknown[0]!r}")
        missing = [name for name, f in known.items() if f.default is MISSING and name not in data]
        if missing:
            raise ManifestError(f"manifest.json preprocessing: missing field {missing[0]!r}")
        try:
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ManifestError(f"manifest.json {exc}") from exc


_TUPLE_FIELDS = ("size", "resize_size", "mean", "std", "pad_fill", "alpha_background")


def _check_ints(name: str, value: Any, length: int, minimum: int = 1, maximum: int | None = None) -> None:
    ok = isinstance(value, tuple) and len(value) == length
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
    ok = ok and (maximum is None or all(v <= maximum for v in value))
    if not ok:
        bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ValueError(f"preprocessing.{name}: expected {length} integers {bounds}, got {value!r}")


def _check_floats(name: str, value: Any, length: int = 3) -> None:
    ok = isinstance(value, tuple) and len(value) == length
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        shown = value[0] if length == 1 and isinstance(value, tuple) else value
        raise ValueError(f"preprocessing.{name}: expected {length} finite number(s), got {shown!r}")


def preprocess(images: Sequence[Image.Image], cfg: Preprocessing) -> np.ndarray:
    """Turn PIL images into the model's float32 NCHW input (contiguous).

    Images may differ in size; each is resized and cropped to ``cfg.size``.
    """
    height, width = cfg.size
    out = np.empty((len(images), 3, height, width), dtype=np.float32)
    lut = _lookup_table(cfg)
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ImageError(f"item {i}: expected a PIL image, got {type(image).__name__} (use load_images)")
        if image.width == 0 or image.height == 0:
            raise ImageError(f"item {i}: empty image ({image.width}x{image.height})")
        pixels = _center_crop(np.asarray(_resize(_to_rgb(image, cfg, i), cfg)), cfg)
        for c in range(3):
            np.take(lut[c], pixels[:, :, c], out=out[i, c], mode="clip")  # uint8 indices: in range
    return out


def _to_rgb(image: Image.Image, cfg: Preprocessing, index: int) -> Image.Image:
    if not cfg.convert_rgb:
        if image.mode != "RGB":
            raise ImageError(f"item {index}: mode {image.mode} image, and this model takes RGB only")
        return image
    if cfg.alpha_background is not None:
        # transformers' convert_to_rgb: any alpha band or palette transparency is
        # composited onto the background; PIL's convert would drop it.
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*cfg.alpha_background, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resized_size(height: int, width: int, cfg: Preprocessing) -> tuple[int, int]:
    """The ``(height, width)`` an image of this size has after the resize step."""
    if cfg.resize == "none":
        return height, width
    if cfg.resize == "exact":
        return cfg.resize_size[0], cfg.resize_size[1]
    if cfg.resize == "keep_ratio":
        # timm ResizeKeepRatio.get_params: a blend of the two scale ratios, sides rounded.
        ratio_h, ratio_w = height / cfg.resize_size[0], width / cfg.resize_size[1]
        longest = cfg.resize_longest
        ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
        return round(height / ratio), round(width / ratio)
    # torchvision _compute_resized_output_size: the long side is truncated, not rounded.
    short, long = (width, height) if width <= height else (height, width)
    new_short = cfg.resize_size[0]
    new_long = int(new_short * long / short)
    if cfg.resize_max_size is not None and new_long > cfg.resize_max_size:
        new_short, new_long = int(cfg.resize_max_size * new_short / new_long), cfg.resize_max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _resize(image: Image.Image, cfg: Preprocessing) -> Image.Image | np.ndarray:
    height, width = resized_size(image.height, image.width, cfg)
    if height * width > MAX_SIDE * MAX_SIDE:  # a sliver of an image resized by its short side
        raise ImageError(f"{image.width}x{image.height} image would be resized to {width}x{height}, "
                         f"over {MAX_SIDE}x{MAX_SIDE} pixels (extreme aspect ratio)")
    if (height, width) == (image.height, image.width):
        return image  # torchvision returns the input untouched; Pillow would copy it
    if cfg.resize_kernel == "torchvision":
        return _tv_resize(np.asarray(image), height, width, cfg.interpolation)
    return image.resize((width, height), INTERPOLATIONS[cfg.interpolation])


# torchvision's antialiased uint8 resize (ATen's separable AA kernels, as UpSampleKernel's
# uint8 paths run them): Pillow's filters and support, weights normalized in float64 and
# then rounded to int16 with the most fraction bits that keep the largest weight under
# 2**15; a horizontal pass, then a vertical one, each rounding back to uint8.
_TV_FILTERS = ("bilinear", "bicubic")


def _tv_filter(name: str) -> tuple[float, Any]:
    if name == "bilinear":
        return 1.0, lambda x: np.maximum(0.0, 1.0 - np.abs(x))
    a = -0.5  # the antialiased bicubic uses Pillow's a, not the -0.75 of the plain one

    def cubic(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                        np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))

    return 2.0, cubic


def _tv_weights(insize: int, outsize: int, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Per output index: int16-valued weights, the input indices they apply to, and their precision."""
    support, fn = _tv_filter(name)
    scale = insize / outsize
    filter_scale = max(scale, 1.0)
    support *= filter_scale
    center = scale * (np.arange(outsize) + 0.5)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xsize = np.minimum((center + support + 0.5).astype(np.int64), insize) - xmin
    k = np.arange(int(xsize.max()))
    weights = fn((k[None, :] + xmin[:, None] - center[:, None] + 0.5) / filter_scale)
    weights = np.where(k[None, :] < xsize[:, None], weights, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    largest = float(weights.max())
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    as_int = np.where(scaled < 0, scaled - 0.5, scaled + 0.5).astype(np.int64)  # C's truncation
    return as_int, np.minimum(xmin[:, None] + k[None, :], insize - 1), precision


def _tv_pass(pixels: np.ndarray, axis: int, outsize: int, name: str) -> np.ndarray:
    weights, index, precision = _tv_weights(pixels.shape[axis], outsize, name)
    src = pixels.astype(np.int64)
    shape = list(pixels.shape)
    shape[axis] = outsize
    acc = np.zeros(shape, dtype=np.int64)
    for k in range(weights.shape[1]):
        if axis == 1:
            acc += weights[None, :, k, None] * src[:, index[:, k], :]
        else:
            acc += weights[:, k, None, None] * src[index[:, k], :, :]
    return np.clip((acc + (1 << (precision - 1))) >> precision, 0, 255).astype(np.uint8)


def _tv_resize(pixels: np.ndarray, height: int, width: int, name: str) -> np.ndarray:
    """uint8 HWC ``pixels`` resized as ``torchvision``'s ``resize(antialias=True)`` resizes a uint8 tensor."""
    if pixels.shape[1] != width:
        pixels = _tv_pass(pixels, 1, width, name)
    if pixels.shape[0] != height:
        pixels = _tv_pass(pixels, 0, height, name)
    return pixels


def _crop_starts(height: int, width: int, cfg: Preprocessing) -> tuple[int, int]:
    """Where the center crop starts in a resized image of this size (negative: padded before)."""
    starts: list[int] = []
    for n, target in zip((height, width), cfg.size):
        if target > n:
            # torchvision puts the odd padding pixel after, transformers before.
            excess = target - n
            starts.append(-(math.ceil(excess / 2) if cfg.crop_offset == "floor" else excess // 2))
        elif cfg.crop_offset == "round":
            starts.append(int(round((n - target) / 2.0)))  # banker's rounding, as torchvision
        else:
            starts.append((n - target) // 2)
    return starts[0], starts[1]


def view_box(height: int, width: int, cfg: Preprocessing) -> tuple[float, float, float, float]:
    """The part of a ``height`` x ``width`` image the model sees, as (left, top, right, bottom) in
    its own pixels (past its edges where the crop pads): where an explanation's map lies on it."""
    rh, rw = resized_size(height, width, cfg)
    top, left = _crop_starts(rh, rw, cfg) if cfg.center_crop else (0, 0)
    sy, sx = height / rh, width / rw
    return left * sx, top * sy, (left + cfg.size[1]) * sx, (top + cfg.size[0]) * sy


def _center_crop(pixels: np.ndarray, cfg: Preprocessing) -> np.ndarray:
    """Crop (padding first where needed) uint8 HWC pixels to ``cfg.size``."""
    if not cfg.center_crop:
        return pixels
    top, left = _crop_starts(pixels.shape[0], pixels.shape[1], cfg)
    padded_shape = list(pixels.shape)
    for axis, target in enumerate(cfg.size):
        padded_shape[axis] = max(target, pixels.shape[axis])
    if top < 0 or left < 0:
        canvas = np.empty(padded_shape, dtype=pixels.dtype)
        canvas[...] = np.asarray(cfg.pad_fill, dtype=pixels.dtype)
        dst_top, dst_left = max(-top, 0), max(-left, 0)
        canvas[dst_top : dst_top + pixels.shape[0], dst_left : dst_left + pixels.shape[1]] = pixels
        pixels = canvas
        top, left = max(top, 0), max(left, 0)
    return pixels[top : top + cfg.size[0], left : left + cfg.size[1]]


def _lookup_table(cfg: Preprocessing) -> np.ndarray:
    """Per channel, the float32 value of each uint8 level after rescale and normalize.

    transformers rescales as ``(x.astype(float64) * factor).astype(float32)`` and
    torchvision's ``to_tensor`` as ``x.float() / 255``; for 1/255 the two agree on
    all 256 levels. Both then normalize in float32 as ``(x - mean) / std``, which
    this table repeats operation for operation, so the result is bit-exact.
    """
    levels = np.arange(256, dtype=np.float64)
    if cfg.rescale_factor is not None:
        levels = levels * cfg.rescale_factor
    levels = levels.astype(np.float32)
    if cfg.mean is None:
        return np.stack([levels] * 3)
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None]
    return np.ascontiguousarray((levels[None, :] - mean) / std, dtype=np.float32)
