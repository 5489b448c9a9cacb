"""Calibration and evaluation inputs, preprocessed exactly as the manifest says.

A data spec is one of:

``PATH/`` (a folder)
    images; when every image sits in a sub-folder, the sub-folder names are
    the labels (one folder per class) and accuracy can be measured.
``PATH.npy``
    an array already preprocessed for the model, (N, C, H, W) float32.
``builtin``
    the built-in default model's own digits: the training split for
    calibration, the held-out split for evaluation. Only for that model.
``photos``
    seeded random crops (position, scale, flip) of the two real photographs
    scikit-learn ships: crops seeded 0 calibrate, crops seeded 1 evaluate.
    Real image statistics for any model, offline; unlabelled.
``patterns``
    seeded procedural images, made differently from photos: colour gradients,
    stripes and checkerboards at random angles and pitches, discs and
    smooth noise fields. ``optimize`` judges on them as a second, differently
    made held-out set. Unlabelled; needs nothing beyond numpy and Pillow.
``synthetic``
    seeded normal noise; calibration refuses it unless explicitly allowed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from enginekit.errors import InputError
from enginekit.manifest import Manifest
from enginekit.runtimes.images import expand_image_paths, load_images
from enginekit.runtimes.preprocess import Preprocessing, preprocess

__all__ = ["InputSet", "describe_data", "load_inputs", "pattern_images", "photo_crops", "photos_available",
           "split_every"]


@dataclass(frozen=True)
class InputSet:
    """Preprocessed model inputs, with labels when the source has them."""

    inputs: np.ndarray
    labels: tuple[str, ...] | None
    source: str

    @property
    def size(self) -> int:
        return int(len(self.inputs))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.inputs).tobytes()).hexdigest()

    def record(self) -> dict[str, object]:
        """What the manifest keeps about this set."""
        return {"source": self.source, "size": self.size, "sha256": self.sha256, "labelled": self.labels is not None}

    def take(self, index: Sequence[int] | np.ndarray, source: str | None = None) -> InputSet:
        idx = np.asarray(index, dtype=int)
        labels = tuple(self.labels[i] for i in idx) if self.labels is not None else None
        return InputSet(self.inputs[idx], labels, source or self.source)


def split_every(data: InputSet, every: int = 5) -> tuple[InputSet, InputSet]:
    """Deterministic split: every ``every``-th sample is held out for evaluation,
    the rest calibrate. Interleaved so both halves see every class of a sorted folder."""
    n = data.size
    held = np.arange(n) % every == every - 1
    if held.sum() == 0 or (~held).sum() == 0:
        raise InputError(f"{data.source}: {n} samples are too few to split into calibration and held-out sets")
    return (data.take(np.flatnonzero(~held), f"{data.source} (calibration part)"),
            data.take(np.flatnonzero(held), f"{data.source} (held-out part)"))


def load_inputs(
    spec: str | Path,
    manifest: Manifest,
    *,
    purpose: str,
    limit: int | None = None,
    allow_synthetic: bool = False,
    seed: int = 0,
) -> InputSet:
    """Load ``spec`` for ``manifest``'s model. ``purpose`` is "calibration" or "evaluation"."""
    if manifest.preprocessing is None:
        raise InputError("the artifact records no preprocessing; cannot prepare image inputs")
    cfg = Preprocessing.from_dict(manifest.preprocessing)
    shape = (3, *cfg.size)
    text = str(spec)
    if text == "synthetic":
        if purpose == "calibration" and not allow_synthetic:
            raise InputError(
                "refusing to calibrate on random noise: give --calibration a folder of images or an .npy file, "
                "or pass --allow-synthetic-calibration"
            )
        n = limit or 32
        x = np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)
        return InputSet(x, None, f"synthetic (seeded normal noise, seed {seed})")
    if text == "builtin":
        return _builtin(manifest, cfg, purpose, limit)
    if text == "patterns":
        pattern_seed = seed + 1000 if purpose == "calibration" else seed + 1001
        images = pattern_images(limit or 64, pattern_seed)
        chunks = [preprocess(images[i : i + 32], cfg) for i in range(0, len(images), 32)]
        return InputSet(np.concatenate(chunks), None,
                        f"patterns (seeded gradients, stripes, checkerboards, discs, smooth noise; seed {pattern_seed})")
    if text == "photos":
        crop_seed = seed if purpose == "calibration" else seed + 1
        crops = photo_crops(limit or 64, crop_seed)
        chunks = [preprocess(crops[i : i + 32], cfg) for i in range(0, len(crops), 32)]
        return InputSet(np.concatenate(chunks), None, f"photos (scikit-learn sample photos, crops seeded {crop_seed})")
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder (expected a folder of images, an .npy file, "
                         "'photos', 'patterns' or 'builtin')")
    if path.is_file():
        if path.suffix != ".npy":
            raise InputError(f"{path}: a data file must be a preprocessed .npy array; for images give their folder")
        return _npy(path, shape, limit)
    return _folder(path, cfg, limit)


def _npy(path: Path, shape: tuple[int, ...], limit: int | None) -> InputSet:
    try:
        x = np.load(path, allow_pickle=False)  # never unpickle
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise InputError(f"{path}: array has shape {x.shape}, the model takes (N, {', '.join(map(str, shape))})")
    if x.dtype != np.float32:
        raise InputError(f"{path}: array is {x.dtype}; preprocessed inputs must be float32")
    if len(x) == 0:
        raise InputError(f"{path}: the array holds no samples")
    return InputSet(np.ascontiguousarray(x[:limit]), None, f"npy:{path.resolve()}")


def _folder(path: Path, cfg: Preprocessing, limit: int | None) -> InputSet:
    paths = expand_image_paths([path])
    rel = [p.relative_to(path) for p in paths]
    labelled = all(len(r.parts) >= 2 for r in rel)
    if limit is not None and len(paths) > limit:
        # Spread the pick across the sorted list so a class-per-folder layout keeps every class.
        keep = np.linspace(0, len(paths) - 1, limit).round().astype(int)
        paths, rel = [paths[i] for i in keep], [rel[i] for i in keep]
    chunks = [preprocess(load_images(paths[i : i + 32]), cfg) for i in range(0, len(paths), 32)]
    labels = tuple(r.parts[0] for r in rel) if labelled else None
    return InputSet(np.concatenate(chunks), labels, f"folder:{path.resolve()}")


def _builtin(manifest: Manifest, cfg: Preprocessing, purpose: str, limit: int | None) -> InputSet:
    if manifest.provenance.get("source") != "default":
        raise InputError("'builtin' data belongs to the built-in default model; give a folder of images or an .npy file")
    from PIL import Image

    from enginekit.models.digits import LABELS, digits_split

    x_train, y_train, x_test, y_test = digits_split()
    x, y = (x_train, y_train) if purpose == "calibration" else (x_test, y_test)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    images = [Image.fromarray(a) for a in x]
    split = "training" if purpose == "calibration" else "held-out"
    return InputSet(preprocess(images, cfg), tuple(LABELS[i] for i in y), f"builtin:digits ({split} split)")


def photo_crops(n: int, seed: int) -> list[Any]:
    """``n`` seeded random crops (position, scale, flip) of scikit-learn's two sample photos, as PIL images."""
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise InputError("the 'photos' data needs scikit-learn: pip install 'enginekit[data]'") from exc
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[y : y + side, x : x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(Image.fromarray(np.ascontiguousarray(crop)))
    return crops


def photos_available() -> bool:
    """Whether the ``photos`` set can be made here (scikit-learn ships the two photographs)."""
    import importlib.util

    return importlib.util.find_spec("sklearn") is not None


def describe_data(source: str, samples: int, role: str = "held-out") -> str:
    """What judged a result, for a summary line: "64 held-out photo crops (scikit-learn sample
    photos)", "64 held-out samples of seeded noise (not images)", ... from an :class:`InputSet`'s
    ``source`` and size."""
    text = str(source)
    if text.startswith("photos"):
        what = "photo crops (scikit-learn's sample photos)"
    elif text.startswith("patterns"):
        what = "pattern images (seeded gradients, stripes, checkerboards, discs)"
    elif text.startswith("synthetic"):
        what = "samples of seeded noise (not images)"
    elif text.startswith("builtin:digits"):
        what = "built-in digits"
    elif text.startswith("folder:"):
        what = f"images from {text[len('folder:'):].split(' (')[0]}"
    elif text.startswith("npy:"):
        what = f"samples from {text[len('npy:'):]}"
    else:
        what = f"samples ({text})"
    return f"{samples} {role} {what}".replace("  ", " ")


def pattern_images(n: int, seed: int, size: int = 256) -> list[Any]:
    """``n`` seeded procedural RGB images (``size`` square): a colour gradient, stripes, a
    checkerboard, discs or a smooth noise field each, in random colours, angles and pitches."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = []
    for i in range(n):
        kind = i % 5
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, np.pi)
        u = np.cos(angle) * xx + np.sin(angle) * yy
        v = -np.sin(angle) * xx + np.cos(angle) * yy
        if kind == 0:  # gradient
            t = (u - u.min()) / max(float(np.ptp(u)), 1e-6)
        elif kind == 1:  # stripes
            t = 0.5 + 0.5 * np.sin(2 * np.pi * u * rng.uniform(3, 40))
        elif kind == 2:  # checkerboard
            pitch = rng.uniform(4, 24)
            t = ((np.floor(u * pitch) + np.floor(v * pitch)) % 2).astype(np.float32)
        elif kind == 3:  # discs on a gradient
            t = 0.3 * (u - u.min()) / max(float(np.ptp(u)), 1e-6)
            for _ in range(int(rng.integers(1, 6))):
                cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
                t = np.where((xx - cx) ** 2 + (yy - cy) ** 2 < r * r, rng.uniform(0.5, 1.0), t)
        else:  # smooth noise
            coarse = rng.uniform(0, 1, (int(rng.integers(4, 16)),) * 2).astype(np.float32)
            t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                           np.float32) / 255
        img = c0 + (c1 - c0) * t[..., None]
        img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
        pil = Image.fromarray(img, "RGB")
        if rng.random() < 0.5:
            pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
        images.append(pil)
    return images
