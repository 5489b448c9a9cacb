"""Fidelity numbers: how far an engine's outputs are from a reference.

Numpy only, so the runtime, quant and bench stages share one definition of
"cosine" and "agreement".
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["cosine_similarity", "compare_outputs", "top1_agreement", "psnr"]


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
