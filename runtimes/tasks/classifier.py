"""The image-classification task: images in, labelled predictions or embeddings out.

Sits on any :class:`Runner` whose engine takes ``pixel_values`` and returns
``logits`` and ``embedding``; preprocessing comes from the manifest. Imports
numpy and Pillow only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from enginekit.errors import BackendError, InputError, ManifestError
from enginekit.manifest import Manifest
from enginekit.runtimes.base import Runner, run_batched
from enginekit.runtimes.images import load_images
from enginekit.runtimes.preprocess import Preprocessing, preprocess

__all__ = ["Prediction", "ImageClassifier", "softmax"]


@dataclass(frozen=True)
class Prediction:
    """The classifier's answer for one image."""

    label: str
    index: int
    score: float
    #: The best ``k`` classes as (label, probability), best first.
    top_k: tuple[tuple[str, float], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "index": self.index,
            "score": self.score,
            "top_k": [{"label": lbl, "score": s} for lbl, s in self.top_k],
        }


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


ImageLike = Any  # str | Path | PIL.Image.Image | np.ndarray


class ImageClassifier:
    """``predict`` and ``embed`` over a loaded engine.

    Accepts file paths, encoded image bytes, PIL images and uint8 arrays
    (H, W[, C]); a single image may be passed bare. Work is split into batches of ``batch_size``.
    """

    task = "image-classification"
    #: Classifier families ONNX Runtime's transformer optimizer fuses, with its model_type for each
    #: (timm's other architectures keep their module name as family and are not fused).
    FUSION_MODEL_TYPES = {"vit": "vit"}

    @classmethod
    def fusion_model_type(cls, manifest: Manifest) -> str | None:
        """The transformer optimizer's model_type for this artifact, None where it has none."""
        return cls.FUSION_MODEL_TYPES.get(manifest.family)

    def __init__(self, runner: Runner, manifest: Manifest, path: Path | None = None, batch_size: int = 8) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if manifest.preprocessing is None:
            raise ManifestError("image-classification artifact has no preprocessing section")
        self.runner = runner
        self.manifest = manifest
        self.path = path
        self.batch_size = batch_size
        self.preprocessing = Preprocessing.from_dict(manifest.preprocessing)
        names = {o.name for o in runner.outputs}
        if "logits" not in names:
            raise ManifestError(f"classifier engine must output 'logits' (and 'embedding'), it has {sorted(names)}")
        #: Whether the engine gives the pre-logits features (enginekit's exports do; an imported
        #: optimum engine gives its logits only).
        self.has_embedding = "embedding" in names
        self._input = runner.inputs[0].name
        num_classes = next(o for o in runner.outputs if o.name == "logits").shape[-1]
        self.labels: tuple[str, ...] = _check_labels(manifest.task_config.get("labels"), num_classes)

    @classmethod
    def from_artifact(
        cls, components: Mapping[str, Runner], manifest: Manifest, path: Path, batch_size: int = 8
    ) -> ImageClassifier:
        """The task registry's constructor: the artifact's one component, loaded now."""
        clf = cls(components[manifest.component().name], manifest, path, batch_size=batch_size)
        clf._components = components
        return clf

    #: A shape-profile backend's (TensorRT's) default batch range: one image (opt) up to this many.
    MAX_PROFILE_BATCH = 32

    @classmethod
    def shape_buckets(cls, manifest: Manifest) -> dict[str, Any]:
        """TensorRT's default profile for a classifier: batch 1..32, tuned for one image."""
        return {"*": {"batch": [1, 1, cls.MAX_PROFILE_BATCH]}}

    @staticmethod
    def compile_options(manifest: Manifest, backend: str, precision: str = "fp32", height: int | None = None,
                        width: int | None = None, batch: int | None = None) -> dict[str, Any]:
        """Backend options for compiling a classifier: the precision, and a static batch."""
        if height is not None or width is not None:
            raise InputError("a classifier's input size is fixed by its preprocessing; drop --height/--width")
        extra: dict[str, Any] = {"precision": precision} if precision != "fp32" else {}
        if batch is not None:
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                raise InputError(f"--batch must be a positive batch size, got {batch!r}")
            extra["static_batch"] = batch
        return extra

    @property
    def backend(self) -> str:
        return self.runner.backend

    @property
    def device(self) -> str:
        return self.runner.device

    def _batches(self, images: ImageLike | Sequence[ImageLike]) -> Iterator[np.ndarray]:
        items = _as_list(images)
        if not items:
            raise InputError("no images given")
        for start in range(0, len(items), self.batch_size):
            yield preprocess(load_images(items[start : start + self.batch_size]), self.preprocessing)

    def run_pixels(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Run preprocessed ``pixel_values`` (N, 3, H, W) float32 through the engine
        (an engine built for a fixed batch runs them in slices of it)."""
        if isinstance(pixel_values, np.ndarray) and pixel_values.dtype.kind == "f" and not np.isfinite(pixel_values).all():
            raise InputError("pixel_values hold NaN or infinite values")
        outputs = run_batched(self.runner, pixel_values)
        for name, value in outputs.items():
            # argmax over NaN is 0: an engine that returns NaN would report the first label.
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and np.isnan(value).any():
                raise BackendError(f"{self.path or 'the engine'}: output {name!r} holds NaN "
                                   "(a broken or mis-quantized engine)")
        return outputs

    def logits(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Raw logits, (N, classes) float32."""
        return np.concatenate([self.run_pixels(x)["logits"] for x in self._batches(images)])

    def embed(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Pre-logits features, (N, D) float32."""
        if not self.has_embedding:
            raise InputError(f"{self.path or 'this engine'} outputs logits only (no 'embedding'): an imported "
                             "engine gives what its exporter kept; export the model with enginekit for embeddings")
        return np.concatenate([self.run_pixels(x)["embedding"] for x in self._batches(images)]).astype(np.float32)

    def predict(self, images: ImageLike | Sequence[ImageLike], top_k: int = 5) -> list[Prediction]:
        """One :class:`Prediction` per image, in order."""
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise InputError(f"top_k must be an integer of at least 1, got {top_k!r}")
        probs = softmax(self.logits(images))
        if probs.shape[1] != len(self.labels):
            raise InputError(f"the engine returned {probs.shape[1]} classes, the manifest has "
                             f"{len(self.labels)} labels")
        k = min(top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        out = []
        for row, idx in zip(probs, order):
            best = int(idx[0])
            out.append(
                Prediction(
                    label=self.labels[best],
                    index=best,
                    score=float(row[best]),
                    top_k=tuple((self.labels[int(i)], float(row[int(i)])) for i in idx),
                )
            )
        return out

    def close(self) -> None:
        self.runner.close()
        components = getattr(self, "_components", None)
        if components is not None:
            components.close()

    def __enter__(self) -> ImageClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageClassifier({str(self.path)!r}, backend={self.backend!r}, device={self.device!r})"


def _check_labels(labels: Any, num_classes: int | str) -> tuple[str, ...]:
    """The classifier section's labels: a list of strings, one per output class
    (``num_classes`` is a string where the engine's class dimension is symbolic)."""
    if labels is None:
        if not isinstance(num_classes, int):
            raise ManifestError(f"classifier engine has a symbolic class dimension {num_classes!r} and the "
                                "manifest lists no labels")
        return tuple(str(i) for i in range(num_classes))
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple)):
        raise ManifestError(f"manifest.json labels: expected a list of strings, got {type(labels).__name__}")
    bad = next((label for label in labels if not isinstance(label, str)), None)
    if bad is not None:
        raise ManifestError(f"manifest.json labels: expected a list of strings, found {bad!r}")
    if isinstance(num_classes, int) and len(labels) != num_classes:
        raise ManifestError(f"manifest.json labels: {len(labels)} labels for an engine with {num_classes} classes")
    return tuple(labels)


def _as_list(images: Any) -> list[Any]:
    if images is None:
        raise InputError("no images given (got None)")
    if isinstance(images, (str, Path, bytes, bytearray)):
        return [images]
    if isinstance(images, np.ndarray):
        return [images] if images.ndim in (2, 3) else list(images)
    if hasattr(images, "getbands"):  # a PIL image
        return [images]
    try:
        return list(images)
    except TypeError:
        raise InputError(f"not an image or a sequence of images (got {type(images).__name__})") from None
