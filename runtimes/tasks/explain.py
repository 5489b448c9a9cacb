"""Where a classifier looked: attention rollout and occlusion maps, in numpy.

- **Attention rollout** (Abnar & Zuidema, 2020): per layer, the attention probabilities fused
  over heads (mean, or max/min), plus the identity for the residual path, rows renormalised;
  multiplied across layers. The query token's row over the patch tokens (the class token's; the
  mean of the patch rows for a model that pools its patches) is the map on the patch grid. It
  reads the probabilities the engine itself computes (:mod:`enginekit.runtimes.attention_taps`).
- **Occlusion**: a square of the dataset's mean colour (zero after normalisation) slides over
  the input; the map is how much the explained class's probability drops with each square
  covered. Gradient-free and model-agnostic: it runs the plain engine, batched.

Imports numpy and Pillow only.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from enginekit.errors import InputError, ManifestError

__all__ = ["METHODS", "ExplainOptions", "Explanation", "AttentionLayout", "attention_rollout", "occlusion_grid",
           "colorize", "overlay"]

METHODS = ("rollout", "occlusion")
HEAD_FUSIONS = ("mean", "max", "min")


@dataclass(frozen=True)
class ExplainOptions:
    """How :meth:`ImageClassifier.explain` builds its maps (the method is its own argument)."""

    #: Rollout: how each layer's heads become one matrix.
    head_fusion: str = "mean"
    #: Rollout: the fraction of each layer's weakest attention set to zero before the identity is
    #: added (0 keeps all; 0.9 is the usual sharpening of Gildenblat's vit-explain).
    discard_ratio: float = 0.0
    #: Occlusion: side of the grey square in input pixels (0: an eighth of the input's shorter side).
    window: int = 0
    #: Occlusion: step between squares in input pixels (0: the window, squares side by side).
    stride: int = 0
    #: Occlusion: images per engine call.
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.head_fusion not in HEAD_FUSIONS:
            raise InputError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {self.head_fusion!r}")
        ratio = self.discard_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise InputError(f"discard_ratio must be a number in [0, 1), got {ratio!r}")
        for name in ("window", "stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be a whole number of pixels (0: automatic), got {value!r}")
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InputError(f"batch_size must be a positive integer, got {size!r}")


@dataclass(frozen=True, eq=False)
class Explanation:
    """One image's verdict and where it came from."""

    #: The classifier's answer for the image (an :class:`~enginekit.runtimes.tasks.classifier.Prediction`).
    prediction: Any
    #: ``rollout`` or ``occlusion``.
    method: str
    #: The map on the model's grid (rollout: its patches; occlusion: the squares' positions), rows
    #: top to bottom; rollout: the query token's share of attention per patch; occlusion: the drop
    #: of the predicted class's probability with that square covered.
    grid: np.ndarray
    #: Where the model's input lies on the image given: (left, top, right, bottom) in its pixels.
    box: tuple[float, float, float, float]

    def heatmap(self) -> np.ndarray:
        """The grid scaled to [0, 1] (occlusion: drops only, a rise in score is 0)."""
        grid = np.asarray(self.grid, dtype=np.float32)
        if self.method == "occlusion":
            grid = np.maximum(grid, 0.0)
            top = float(grid.max())
            return grid / top if top > 0 else grid
        low, high = float(grid.min()), float(grid.max())
        return (grid - low) / (high - low) if high > low else np.zeros_like(grid)

    def overlay(self, image: Any, alpha: float = 0.5) -> Any:
        """``image`` (the one explained, a PIL image) with the heatmap laid over the part the model saw."""
        return overlay(image, self.heatmap(), self.box, alpha)

    def overlay_png(self, image: Any, alpha: float = 0.5) -> bytes:
        buf = io.BytesIO()
        self.overlay(image, alpha).save(buf, format="PNG")
        return buf.getvalue()

    def to_dict(self, image: Any = None) -> dict[str, Any]:
        """JSON-ready: the prediction, the method, the raw grid and the box; with ``image``, the
        overlay as a base64 PNG too."""
        out: dict[str, Any] = {"method": self.method, "grid": np.asarray(self.grid, dtype=float).tolist(),
                               "box": [float(v) for v in self.box]}
        if image is not None:
            out["overlay_png"] = base64.b64encode(self.overlay_png(image)).decode("ascii")
        return out


@dataclass(frozen=True)
class AttentionLayout:
    """How an engine's T tokens lie on the image: ``prefix_tokens`` first (class, registers,
    distillation), then the patch grid, rows first; ``query`` is whose row rollout reads."""

    prefix_tokens: int
    grid: tuple[int, int]
    #: ``cls``: the first token's row (a head over the class token); ``mean``: the mean of the
    #: patch rows (a head over pooled patches).
    query: str = "cls"

    @classmethod
    def resolve(cls, record: Mapping[str, Any] | None, tokens: int, size: tuple[int, int]) -> AttentionLayout:
        """The export's record (``manifest.extra["attention"]``), checked against the engine's
        ``tokens``; for an artifact exported before that record, the layout whose square-celled
        grid fits ``size`` (height, width) with the fewest prefix tokens, one (a class token) first."""
        if record:
            try:
                layout = cls(int(record["prefix_tokens"]), (int(record["grid"][0]), int(record["grid"][1])),
                             str(record.get("query", "cls")))
            except (KeyError, TypeError, ValueError, IndexError):
                raise ManifestError(f"manifest.json extra.attention is not a layout record: {record!r}") from None
            if layout.prefix_tokens + layout.grid[0] * layout.grid[1] != tokens or layout.query not in ("cls", "mean"):
                raise ManifestError(f"manifest.json extra.attention ({dict(record)}) does not fit the engine's "
                                    f"{tokens} tokens; export the model again")
            return layout
        height, width = size
        for prefix in (1, 0, 2, 3, 4, 5, 6, 7, 8, 9):
            patches = tokens - prefix
            rows = round(math.sqrt(patches * height / width)) if patches > 0 else 0
            if rows and patches % rows == 0 and height * (patches // rows) == width * rows:
                return cls(prefix, (rows, patches // rows), "cls" if prefix else "mean")
        raise ManifestError(f"cannot lay the engine's {tokens} attention tokens on a patch grid of a "
                            f"{height}x{width} input; export the model again with this enginekit (it records how)")


def attention_rollout(attentions: Sequence[np.ndarray], layout: AttentionLayout, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> np.ndarray:
    """Rollout of per-layer probabilities (each (N, heads, T, T), in layer order) -> (N, rows, cols)."""
    joint: np.ndarray | None = None
    for probs in attentions:
        probs = np.asarray(probs, dtype=np.float64)
        fused = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion](probs, axis=1)
        if discard_ratio > 0:
            fused = _discard(fused, discard_ratio)
        tokens = fused.shape[-1]
        fused = fused + np.eye(tokens)[None]
        fused = fused / fused.sum(axis=-1, keepdims=True)
        joint = fused if joint is None else fused @ joint
    if joint is None:
        raise InputError("attention rollout needs at least one layer's attention")
    p = layout.prefix_tokens
    row = joint[:, 0, p:] if layout.query == "cls" else joint[:, p:, p:].mean(axis=1)
    return row.reshape(len(row), *layout.grid).astype(np.float32)


def _discard(fused: np.ndarray, ratio: float) -> np.ndarray:
    """Zero each matrix's weakest ``ratio`` of entries, never the first token's attention to itself."""
    flat = fused.reshape(len(fused), -1).copy()
    k = int(flat.shape[1] * ratio)
    if k:
        weakest = np.argpartition(flat, k - 1, axis=1)[:, :k]
        keep = flat[:, 0].copy()
        np.put_along_axis(flat, weakest, 0.0, axis=1)
        flat[:, 0] = keep
    return flat.reshape(fused.shape)


def occlusion_grid(pixels: np.ndarray, target: int, probabilities: Callable[[np.ndarray], np.ndarray],
                   options: ExplainOptions) -> np.ndarray:
    """The probability drop of class ``target`` with each square covered, for one image's
    ``pixels`` (3, H, W): (rows, cols). ``probabilities`` maps a batch of pixels to class probabilities."""
    _, height, width = pixels.shape
    window = options.window or max(1, min(height, width) // 8)
    stride = options.stride or window
    if window > min(height, width):
        raise InputError(f"occlusion window {window} px is larger than the model's {height}x{width} input")
    tops = list(range(0, height - window + 1, stride))
    lefts = list(range(0, width - window + 1, stride))
    base = float(probabilities(pixels[None])[0, target])
    boxes = [(t, left) for t in tops for left in lefts]
    drops = np.empty(len(boxes), dtype=np.float32)
    for start in range(0, len(boxes), options.batch_size):
        chunk = boxes[start : start + options.batch_size]
        batch = np.repeat(pixels[None], len(chunk), axis=0)
        for i, (t, left) in enumerate(chunk):
            batch[i, :, t : t + window, left : left + window] = 0.0  # the mean colour, normalised
        drops[start : start + len(chunk)] = base - probabilities(batch)[:, target]
    return drops.reshape(len(tops), len(lefts))


# Anchors of matplotlib's "inferno" (perceptually uniform, legible in grey), interpolated here.
_INFERNO = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                     [250, 193, 39], [252, 255, 164]], dtype=np.float32)


def colorize(heat: np.ndarray) -> np.ndarray:
    """A [0, 1] map -> uint8 RGB (H, W, 3) through the inferno colour map."""
    pos = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0) * (len(_INFERNO) - 1)
    low = np.floor(pos).astype(np.int64).clip(0, len(_INFERNO) - 2)
    frac = (pos - low)[..., None]
    return (_INFERNO[low] * (1 - frac) + _INFERNO[low + 1] * frac).round().astype(np.uint8)


def overlay(image: Any, heat: np.ndarray, box: tuple[float, float, float, float], alpha: float = 0.5) -> Any:
    """``image`` with ``heat`` ([0, 1], the model's grid) coloured and blended over ``box``; the
    rest of the image, which the model did not see, is dimmed."""
    from PIL import Image

    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = base.shape[:2]
    left, top, right, bottom = box
    cols, rows = max(1, round(right - left)), max(1, round(bottom - top))
    # Bilinear over the grid's cell centres, as a heatmap is usually drawn.
    heat_img = Image.fromarray(np.asarray(heat, dtype=np.float32)).resize((cols, rows), Image.Resampling.BILINEAR)
    colour = colorize(np.asarray(heat_img)).astype(np.float32)
    out = base * 0.45  # outside the model's view
    x0, y0 = round(left), round(top)
    sx0, sy0 = max(0, -x0), max(0, -y0)
    dx0, dy0 = max(0, x0), max(0, y0)
    w, h = min(width - dx0, cols - sx0), min(height - dy0, rows - sy0)
    if w > 0 and h > 0:
        region = base[dy0 : dy0 + h, dx0 : dx0 + w]
        out[dy0 : dy0 + h, dx0 : dx0 + w] = region * (1 - alpha) + colour[sy0 : sy0 + h, sx0 : sx0 + w] * alpha
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
