"""Reading images for the task layer: paths, folders, PIL images and uint8 arrays.

Every failure is an :class:`~enginekit.errors.ImageError` whose one-line message
names the item and the reason, so the CLI and the server can show it as is.
EXIF orientation is deliberately not applied: timm and transformers feed the
stored pixels to the model, and so do we.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from enginekit.errors import ImageError, one_line

__all__ = ["IMAGE_EXTENSIONS", "ImageInput", "MAX_PIXELS_ENV", "max_pixels", "expand_image_paths", "load_images",
           "load_init_image", "vae_preprocess"]

#: Largest image (width x height) enginekit decodes; ``ENGINEKIT_MAX_PIXELS`` overrides it.
MAX_PIXELS_ENV = "ENGINEKIT_MAX_PIXELS"
_DEFAULT_MAX_PIXELS = 50_000_000

#: Suffixes (lower case) that folder expansion picks up.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

ImageInput = Union[str, Path, Image.Image, np.ndarray, bytes]

# uint8 array layouts we accept, by number of channels (None: a 2-D array).
_ARRAY_MODES = {None: "L", 1: "L", 3: "RGB", 4: "RGBA"}


def max_pixels() -> int:
    """``$ENGINEKIT_MAX_PIXELS``, else 50 megapixels: below Pillow's decompression-bomb
    threshold (89 MP, whose warning is multi-line), so a huge image is one clear refusal."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return _DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise ImageError(f"{MAX_PIXELS_ENV}={raw!r}: expected a number of pixels") from None
    if value < 1:
        raise ImageError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive number of pixels")
    return value


def _check_pixels(width: int, height: int, name: str) -> None:
    limit = max_pixels()
    if width * height > limit:
        raise ImageError(f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of "
                         f"{limit / 1e6:g} (set {MAX_PIXELS_ENV} to raise it)")


def _safe_path(path: Path, name: str | None = None) -> tuple[bool, bool]:
    """(exists, is_dir) of ``path``; a NUL byte or an over-long name is an ImageError."""
    try:
        return path.exists(), path.is_dir()
    except (ValueError, OSError) as exc:
        shown = repr(str(path))[1:-1]
        shown = shown if len(shown) <= 200 else f"{shown[:120]}...({len(shown)} characters)"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
        raise ImageError(f"{name or shown}: not a usable path ({reason})") from None


def _regular_file(path: Path) -> None:
    """Refuse a FIFO, socket or device before opening it: reading one would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "something other than a regular file")
        raise ImageError(f"{path}: is {kind}, not an image file")


def expand_image_paths(items: Sequence[str | Path]) -> list[Path]:
    """Keep files, replace each folder by its image files (recursive, sorted).

    A file is kept whatever its suffix, so a mislabelled image still gets read
    (and a non-image gets a clear error from :func:`load_images`). Hidden files
    and folders (``.DS_Store``, macOS ``._x.jpg`` forks) are skipped in folders.
    """
    if isinstance(items, (str, Path)):
        items = [items]
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        exists, is_dir = _safe_path(path)
        if is_dir:
            found = sorted(
                (
                    p
                    for p in path.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS
                    and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                ),
                # By path components, so the order is the same on every Python version.
                key=lambda p: p.relative_to(path).parts,
            )
            if not found:
                suffixes = ", ".join(sorted(IMAGE_EXTENSIONS))
                raise ImageError(f"{path}: folder holds no images (looked for {suffixes})")
            paths.extend(found)
        elif exists:
            paths.append(path)
        else:
            raise ImageError(f"{path}: no such file or folder")
    return paths


def load_images(items: Sequence[ImageInput] | ImageInput) -> list[Image.Image]:
    """Load each item as a PIL image, fully decoded.

    Items are paths (opened and decoded now, so a truncated file fails here),
    encoded bytes (an upload), PIL images (passed through) or uint8 numpy arrays
    shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). A single item may be
    passed on its own. Modes are mostly left as they are (:func:`preprocess`
    converts); 16-bit images are scaled to 8 bits here, since Pillow's own
    conversion clips them to white. Images over :func:`max_pixels` and float
    images holding NaN are refused.
    """
    if items is None:
        raise ImageError("no images given (got None)")
    if isinstance(items, (str, Path, bytes, bytearray, Image.Image, np.ndarray)):
        items = [items]
    return [_load_one(item, index) for index, item in enumerate(items)]


def load_init_image(image: ImageInput | Sequence[ImageInput]) -> Image.Image:
    """One image-to-image init image (alone or as a list of one), loaded and in RGB."""
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            raise ImageError(f"image-to-image takes one init image, got {len(image)}")
        image = image[0]
    return load_images([image])[0].convert("RGB")


def vae_preprocess(image: Image.Image, height: int, width: int) -> np.ndarray:
    """diffusers' ``VaeImageProcessor.preprocess`` for one RGB image at its defaults: resized
    to ``width`` x ``height`` with lanczos (its ``resample``), scaled to [-1, 1]; (1, 3, H, W)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    x = np.asarray(image, dtype=np.float32) / 255.0
    return (x * 2.0 - 1.0).transpose(2, 0, 1)[None]


def _load_one(item: object, index: int) -> Image.Image:
    if isinstance(item, Image.Image):
        _check_pixels(item.width, item.height, f"item {index}")
        try:
            item.load()  # a closed image (or a lazy one whose file went away) fails here, in one line
        except (ValueError, OSError, AttributeError) as exc:
            reason = one_line(exc)
            raise ImageError(f"item {index}: the PIL image cannot be read ({reason}; closed?)") from None
        return _to_8bit(item, f"item {index}")
    if isinstance(item, np.ndarray):
        return _from_array(item, index)
    if isinstance(item, (str, Path)):
        path = Path(item)
        exists, is_dir = _safe_path(path, f"item {index}")
        if is_dir:
            raise ImageError(f"{path}: is a folder (expand it with expand_image_paths)")
        if not exists:
            raise ImageError(f"{path}: no such file")
        _regular_file(path)
        return _decode(path, str(path))
    if isinstance(item, (bytes, bytearray)):
        return _decode(io.BytesIO(item), f"item {index} ({len(item)} bytes)")
    raise ImageError(f"item {index}: not an image (got {type(item).__name__})")


def _decode(source: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        # Pillow's bomb warning is turned into an error and reported in one line
        # (our own limit normally refuses such an image first). catch_warnings
        # is process-wide; the filter only makes one warning class raise.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
        # Leaving the block closes the file (multi-frame formats keep it open
        # after load()); the decoded pixels stay.
        with image:
            _check_pixels(image.width, image.height, name)  # before decoding a single pixel
            image.load()
        return _to_8bit(image, name)
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image (cannot identify image file)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        reason = one_line(exc)
        raise ImageError(f"{name}: too many pixels for Pillow ({reason})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # OSError: truncated or corrupt data; SyntaxError/ValueError: some
        # Pillow plugins report malformed headers this way.
        reason = one_line(exc)
        raise ImageError(f"{name}: corrupt or truncated image ({reason})") from exc


def _to_8bit(image: Image.Image, name: str) -> Image.Image:
    """16-bit and 32-bit integer grey images scaled to 8 bits (Pillow's convert would clip
    every level above 255 to white); float images checked for NaN and kept as they are."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image)
        if image.mode == "I" and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ImageError(f"{name}: 32-bit integer pixels outside 0..65535")
        # Rounded division by 257 maps 0..65535 onto 0..255 exactly at both ends.
        scaled = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return Image.fromarray(scaled, mode="L")
    if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise ImageError(f"{name}: float pixels hold NaN or infinite values")
    return image


def _from_array(array: np.ndarray, index: int) -> Image.Image:
    name = f"item {index} (array of shape {array.shape}, dtype {array.dtype})"
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ImageError(f"{name}: holds NaN or infinite values")
    if array.dtype != np.uint8:
        raise ImageError(f"{name}: expected uint8 pixels (scale floats to 0..255 and cast)")
    channels = array.shape[2] if array.ndim == 3 else None
    if array.ndim not in (2, 3) or channels not in _ARRAY_MODES or 0 in array.shape:
        raise ImageError(f"{name}: expected one image shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    _check_pixels(array.shape[1], array.shape[0], f"item {index}")
    if channels == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array))
