"""Fidelity numbers: how far an engine's outputs are from a reference.

Numpy only, so the runtime, quant and bench stages share one definition of
"cosine" and "agreement".
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["cosine_similarity", "compare_outputs", "top1_agreement", "psnr", "ssim"]


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples of the cosine between rows of ``a`` and ``b`` (flattened per sample)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    num = (a * b).sum(axis=1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = np.divide(num, na * nb, out=np.zeros_like(num), where=(na * nb) > 0)
    # Two all-zero rows agree perfectly; one zero row against a non-zero one does not.
    cos[(na == 0) & (nb == 0)] = 1.0
    return float(cos.mean())


def top1_agreement(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Fraction of samples whose arg-max class is the same in both."""
    return float((np.argmax(ref_logits, axis=-1) == np.argmax(logits, axis=-1)).mean())


def compare_outputs(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``<name>_max_abs`` and ``<name>_cosine`` for every reference output,
    and ``top1_agreement`` when there are ``logits``."""
    report: dict[str, float] = {}
    for name, ref in reference.items():
        if name not in outputs:
            raise KeyError(f"engine output {name!r} is missing")
        got = np.asarray(outputs[name], dtype=np.float32)
        ref = np.asarray(ref, dtype=np.float32)
        if got.shape != ref.shape:
            raise ValueError(f"output {name!r} has shape {got.shape}, reference {ref.shape}")
        report[f"{name}_max_abs"] = float(np.abs(got - ref).max()) if ref.size else 0.0
        report[f"{name}_cosine"] = cosine_similarity(ref, got)
    if "logits" in reference:
        report["top1_agreement"] = top1_agreement(reference["logits"], outputs["logits"])
    return report


def psnr(reference: np.ndarray, image: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``image`` against ``reference`` (inf when equal).

    Images are floats in [0, ``peak``]; 40 dB is a mean error of about 1/100 of the range."""
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(image, dtype=np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"image has shape {got.shape}, reference {ref.shape}")
    mse = float(np.mean((ref - got) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(peak * peak / mse))


def _gaussian_blur(x: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Separable gaussian filter over the first two axes, edges mirrored as scipy's
    ``mode="reflect"`` does (numpy calls it "symmetric")."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    pad = [(radius, radius), (radius, radius)] + [(0, 0)] * (x.ndim - 2)
    padded = np.pad(x, pad, mode="symmetric")
    h, w = x.shape[:2]
    rows = sum(k * padded[i : i + h] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + w] for i, k in enumerate(kernel))


def ssim(reference: np.ndarray, image: np.ndarray, data_range: float = 1.0, sigma: float = 1.5) -> float:
    """Structural similarity of ``image`` against ``reference`` (1.0 when equal).

    As ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...)`` (Wang et al. 2004): gaussian-weighted
    local means, variances and covariance (window radius ``int(3.5 * sigma + 0.5)``),
    K1 = 0.01, K2 = 0.03, the map's border of one radius left out of the mean. Takes
    (H, W), (H, W, C) or a batch (N, H, W, C); colour channels and images are averaged.
    """
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(image, dtype=np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"image has shape {got.shape}, reference {ref.shape}")
    if ref.ndim == 4:
        return float(np.mean([ssim(r, g, data_range, sigma) for r, g in zip(ref, got)]))
    if ref.ndim not in (2, 3):
        raise ValueError(f"ssim takes (H, W), (H, W, C) or (N, H, W, C) images, got shape {ref.shape}")
    radius = int(3.5 * sigma + 0.5)
    if min(ref.shape[:2]) < 2 * radius + 1:
        raise ValueError(f"images of {ref.shape[0]}x{ref.shape[1]} are smaller than the {2 * radius + 1}-pixel window")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = _gaussian_blur(ref, sigma, radius), _gaussian_blur(got, sigma, radius)
    vx = _gaussian_blur(ref * ref, sigma, radius) - mu_x * mu_x
    vy = _gaussian_blur(got * got, sigma, radius) - mu_y * mu_y
    cov = _gaussian_blur(ref * got, sigma, radius) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (vx + vy + c2))
    return float(s[radius:-radius, radius:-radius].mean())
