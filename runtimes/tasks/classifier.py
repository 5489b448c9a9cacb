"""The image-classification task: images in, labelled predictions, embeddings or explanations out.

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
from enginekit.runtimes.attention_taps import ATTENTION_TAP, attention_outputs
from enginekit.runtimes.preprocess import Preprocessing, preprocess, view_box
from enginekit.runtimes.tasks.explain import (METHODS, AttentionLayout, ExplainOptions, Explanation,
                                              attention_rollout, occlusion_grid)

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
    """``predict``, ``embed`` and ``explain`` over a loaded engine.

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
        _check_top_k(top_k)
        return self._predictions(self.logits(images), top_k)

    def explain(self, images: ImageLike | Sequence[ImageLike], method: str = "rollout", *, top_k: int = 5,
                options: ExplainOptions = ExplainOptions()) -> list[Explanation]:
        """One :class:`Explanation` per image, in order: the prediction and a map of where it came from.

        ``method="rollout"``: attention rollout over the attention probabilities the engine computes,
        read from a second graph of the same engine file with those probabilities as outputs (opened
        on the first call and kept; :meth:`predict` keeps running the plain engine, untouched).
        ``method="occlusion"``: the predicted class's probability drop as a grey square slides over
        the input, through the plain engine (any classifier; ``window``x``window`` px squares every
        ``stride`` px, one engine call per square, batched). ``options`` tunes either
        (:class:`~enginekit.runtimes.tasks.explain.ExplainOptions`)."""
        _check_top_k(top_k)
        if method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if not isinstance(options, ExplainOptions):
            raise InputError(f"options must be an ExplainOptions, got {type(options).__name__}")
        items = _as_list(images)
        if not items:
            raise InputError("no images given")
        found: list[Explanation] = []
        # Rollout holds every layer's (heads, T, T) probabilities per image: two images at a time.
        step = min(self.batch_size, 2) if method == "rollout" else self.batch_size
        for start in range(0, len(items), step):
            pil = load_images(items[start : start + step])
            pixels = preprocess(pil, self.preprocessing)
            if method == "rollout":
                logits, grids = self._rollout(pixels, options)
            else:
                logits = self.run_pixels(pixels)["logits"]
                probs = lambda batch: softmax(self.run_pixels(batch)["logits"])  # noqa: E731
                grids = np.stack([occlusion_grid(x, int(np.argmax(row)), probs, options)
                                  for x, row in zip(pixels, logits)])
            for image, pred, grid in zip(pil, self._predictions(logits, top_k), grids):
                found.append(Explanation(pred, method, grid, view_box(image.height, image.width, self.preprocessing)))
        return found

    def _rollout(self, pixels: np.ndarray, options: ExplainOptions) -> tuple[np.ndarray, np.ndarray]:
        components = getattr(self, "_components", None)
        if components is None:
            raise InputError("attention rollout reads a second graph of the artifact's engine: open the "
                             "classifier with enginekit.load(), or use method='occlusion'")
        runner = components.cut(self.manifest.component().name, ATTENTION_TAP)
        out = run_batched(runner, pixels)
        if any(np.isnan(v).any() for v in out.values() if v.dtype.kind == "f"):
            raise BackendError(f"{self.path or 'the engine'}: its attention graph returned NaN "
                               "(a broken or mis-quantized engine)")
        names = attention_outputs(out)
        if not names or out[names[0]].ndim != 4 or out[names[0]].shape[-1] != out[names[0]].shape[-2]:
            raise BackendError(f"{self.path or 'the engine'}: its Softmax outputs are not attention probabilities "
                               "(N, heads, T, T); use method='occlusion'")
        if len({out[n].shape[-1] for n in names}) > 1:
            raise BackendError(f"{self.path or 'the engine'}: its layers attend over different numbers of tokens "
                               "(merged between layers: export --token-merge); rollout needs the same tokens in "
                               "every layer; use method='occlusion'")
        layout = AttentionLayout.resolve(self.manifest.extra.get("attention"), out[names[0]].shape[-1],
                                         self.preprocessing.size)
        grids = attention_rollout([out[n] for n in names], layout, options.head_fusion, options.discard_ratio)
        return out["logits"], grids

    def _predictions(self, logits: np.ndarray, top_k: int) -> list[Prediction]:
        probs = softmax(logits)
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


def _check_top_k(top_k: Any) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InputError(f"top_k must be an integer of at least 1, got {top_k!r}")


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
