"""The fidelity gate: an engine against its float parent on held-out inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from enginekit.errors import FidelityError
from enginekit.fidelity import compare_outputs
from enginekit.quant.data import InputSet, describe_data
from enginekit.runtimes.base import Runner, run_batched

__all__ = ["Budget", "check", "measure", "misses", "run_all"]


@dataclass(frozen=True)
class Budget:
    min_agreement: float
    min_cosine: float

    def to_dict(self) -> dict[str, float]:
        return {"min_agreement": self.min_agreement, "min_cosine": self.min_cosine}


def run_all(runner: Runner, data: InputSet, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Run every sample through ``runner`` in batches; concatenate outputs by name."""
    out = run_batched(runner, data.inputs, batch_size)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def accuracy_of(logits: np.ndarray, truth: tuple[str, ...], labels: tuple[str, ...]) -> float:
    return float(np.mean([labels[i] == t for i, t in zip(logits.argmax(1), truth)]))


def measure(
    reference: dict[str, np.ndarray] | Runner,
    engine: dict[str, np.ndarray] | Runner,
    data: InputSet,
    label_names: tuple[str, ...] | None,
) -> dict[str, Any]:
    """Agreement, cosine and max abs error of ``engine`` against ``reference`` (each a
    runner, or its outputs on ``data`` already computed); accuracy of both when labelled."""
    ref = reference if isinstance(reference, dict) else run_all(reference, data)
    got = engine if isinstance(engine, dict) else run_all(engine, data)
    report: dict[str, Any] = {"inputs": data.source, "samples": data.size}
    report.update(compare_outputs({k: ref[k] for k in ("logits", "embedding") if k in ref}, got))
    if data.labels is not None and label_names is not None:
        report["accuracy"] = accuracy_of(got["logits"], data.labels, label_names)
        report["reference_accuracy"] = accuracy_of(ref["logits"], data.labels, label_names)
    return report


def misses(report: dict[str, Any], budget: Budget) -> list[str]:
    """What ``report`` misses of ``budget``, one phrase with the numbers each; [] when it holds."""
    out = []
    if report["top1_agreement"] < budget.min_agreement:
        out.append(f"top-1 agreement {report['top1_agreement']:.4f} < {budget.min_agreement}")
    if report["logits_cosine"] < budget.min_cosine:
        out.append(f"logits cosine {report['logits_cosine']:.5f} < {budget.min_cosine}")
    return out


def check(report: dict[str, Any], budget: Budget, what: str) -> None:
    """Raise :class:`FidelityError` naming the numbers when ``report`` misses ``budget``."""
    missed = misses(report, budget)
    if missed:
        extra = ""
        if "accuracy" in report:
            extra = f"; accuracy {report['accuracy']:.4f} vs float {report['reference_accuracy']:.4f}"
        raise FidelityError(
            f"{what} misses its fidelity budget on {describe_data(report.get('inputs', ''), report['samples'])}: "
            f"{'; '.join(missed)} (max abs {report['logits_max_abs']:.3g}{extra}); nothing was written"
        )
