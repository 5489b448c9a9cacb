"""The data behind the built-in default model: scikit-learn's handwritten digits.

``load_digits()`` ships inside scikit-learn (1,797 8x8 images, no download), so
the default model can be trained, evaluated and calibrated offline. The split is
fixed (:data:`SPLIT_SEED`, :data:`TEST_FRACTION`, stratified) so the accuracy in
the model card can be re-measured anywhere.

This module imports scikit-learn only inside the functions that need it and
never imports torch, so the runtime path can use :func:`write_digit_images` to
make an image folder for ``evaluate`` or calibration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from enginekit.errors import InputError, SourceError

__all__ = [
    "DEFAULT_MODEL_DIR",
    "LABELS",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "digits_split",
    "write_digit_images",
]

DEFAULT_MODEL_DIR = Path(__file__).parent / "digits-vit"
"""The shipped default model: timm ``config.json`` + ``model.safetensors`` + ``README.md``."""

SPLIT_SEED = 0
TEST_FRACTION = 0.2
LABELS = tuple(str(d) for d in range(10))

_SPLITS = ("train", "test")


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``x_train, y_train, x_test, y_test`` of scikit-learn's digits.

    Images are uint8 grayscale of shape (N, 8, 8), the 0..16 ink levels scaled
    to 0..255; labels are int64 digits 0..9. The split is stratified and seeded,
    so every call returns the same arrays.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SourceError("the digits data needs scikit-learn: pip install 'enginekit[data]'") from exc

    data = load_digits()
    images = np.round(data.images * 255 / 16).astype(np.uint8)
    labels = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return x_train, y_train, x_test, y_test


def write_digit_images(out_dir: str | Path, split: str = "test", limit: int | None = None) -> Path:
    """Write one split of the digits as PNGs under ``out_dir/<digit>/<index:04d>.png``.

    One folder per class (the layout ``evaluate`` and calibration read); the
    index is the image's position in the split, and ``limit`` keeps the first
    ``limit`` images of it. Images are 8x8 grayscale (mode "L"). The folder is
    written to a temporary sibling and renamed into place, so an interrupted call
    leaves nothing behind; an existing non-empty ``out_dir`` is refused.
    """
    from PIL import Image

    if split not in _SPLITS:
        raise InputError(f"unknown digits split {split!r}; choose one of {', '.join(_SPLITS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive integer or None, got {limit!r}")
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            raise InputError(f"{out} is not empty; choose a new folder or remove it first")

    x_train, y_train, x_test, y_test = digits_split()
    images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]

    from enginekit.artifact import atomic_folder

    # overwrite=True only ever replaces the empty folder checked above.
    with atomic_folder(out, overwrite=True) as tmp:
        for label in LABELS:
            (tmp / label).mkdir()
        for index, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(tmp / LABELS[label] / f"{index:04d}.png")
    return out
