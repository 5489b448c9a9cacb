"""Reading images for the task layer: paths, folders, PIL images and uint8 arrays.

Every failure is an :class:`~enginekit.errors.ImageError` whose one-line message
names the item and the reason, so the CLI and the server can show it as is.
EXIF orientation is deliberately not applied: timm and transformers feed the
stored pixels to the model, and so do we.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from enginekit.errors import ImageError

__all__ = ["IMAGE_EXTENSIONS", "ImageInput", "expand_image_paths", "load_images"]

#: Suffixes (lower case) that folder expansion picks up.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

ImageInput = Union[str, Path, Image.Image, np.ndarray, bytes]

# uint8 array layouts we accept, by number of channels (None: a 2-D array).
_ARRAY_MODES = {None: "L", 1: "L", 3: "RGB", 4: "RGBA"}


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
        if path.is_dir():
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
        elif path.exists():
            paths.append(path)
        else:
            raise ImageError(f"{path}: no such file or folder")
    return paths


def load_images(items: Sequence[ImageInput] | ImageInput) -> list[Image.Image]:
    """Load each item as a PIL image, fully decoded.

    Items are paths (opened and decoded now, so a truncated file fails here),
    encoded bytes (an upload), PIL images (passed through) or uint8 numpy arrays
    shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). A single item may be
    passed on its own. Modes are left as they are; :func:`preprocess` converts.
    """
    if isinstance(items, (str, Path, bytes, Image.Image, np.ndarray)):
        items = [items]
    return [_load_one(item, index) for index, item in enumerate(items)]


def _load_one(item: object, index: int) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return _from_array(item, index)
    if isinstance(item, (str, Path)):
        path = Path(item)
        if path.is_dir():
            raise ImageError(f"{path}: is a folder (expand it with expand_image_paths)")
        if not path.exists():
            raise ImageError(f"{path}: no such file")
        return _decode(path, str(path))
    if isinstance(item, (bytes, bytearray)):
        return _decode(io.BytesIO(item), f"item {index} ({len(item)} bytes)")
    raise ImageError(f"item {index}: not an image (got {type(item).__name__})")


def _decode(source: Path | io.BytesIO, name: str) -> Image.Image:
    try:
        # Leaving the block closes the file (multi-frame formats keep it open
        # after load()); the decoded pixels stay.
        with Image.open(source) as image:
            image.load()
        return image
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image (cannot identify image file)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: too many pixels ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # OSError: truncated or corrupt data; SyntaxError/ValueError: some
        # Pillow plugins report malformed headers this way.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"{name}: corrupt or truncated image ({reason})") from exc


def _from_array(array: np.ndarray, index: int) -> Image.Image:
    name = f"item {index} (array of shape {array.shape}, dtype {array.dtype})"
    if array.dtype != np.uint8:
        raise ImageError(f"{name}: expected uint8 pixels (scale floats to 0..255 and cast)")
    channels = array.shape[2] if array.ndim == 3 else None
    if array.ndim not in (2, 3) or channels not in _ARRAY_MODES or 0 in array.shape:
        raise ImageError(f"{name}: expected one image shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if channels == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array))
