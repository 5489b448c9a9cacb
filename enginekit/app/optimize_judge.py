"""Classifier ``optimize``'s judge: its data, PyTorch's reference outputs, and each candidate measured
against them on both held-out sets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.app.optimize_plan import Candidate, OptimizeConfig

__all__ = ["Outcome", "datasets", "judge", "second_spec", "torch_outputs"]


@dataclass
class Outcome:
    """What became of one candidate: its fate, where it was built, its fidelity and timing."""

    candidate: Candidate
    status: str = "pending"  # picked | passed | rejected | failed
    reason: str = ""
    path: Path | None = None
    build_s: float | None = None
    fidelity: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": asdict(self.candidate), "status": self.status, "reason": self.reason,
                "build_s": self.build_s, "fidelity": self.fidelity, "record": self.record}


def datasets(spec: str, manifest: Any, config: OptimizeConfig) -> tuple[Any, Any]:
    from enginekit.quant.data import load_inputs, split_every

    if spec in ("builtin", "photos", "synthetic", "patterns"):
        calib = load_inputs(spec, manifest, purpose="calibration", limit=config.calibration_size,
                            allow_synthetic=spec == "synthetic")
        held = load_inputs(spec, manifest, purpose="evaluation", limit=config.eval_size, seed=1)
        return calib, held
    calib, held = split_every(load_inputs(spec, manifest, purpose="calibration"))
    return (calib.take(range(min(config.calibration_size, calib.size))),
            held.take(range(min(config.eval_size, held.size))))


def torch_outputs(wrapper: Any, x: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    import torch

    parts: dict[str, list[np.ndarray]] = {"logits": [], "embedding": []}
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            logits, emb = wrapper(torch.from_numpy(x[start : start + batch]))
            parts["logits"].append(logits.float().numpy())
            parts["embedding"].append(emb.float().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def second_spec(spec: str) -> str:
    """The second, differently made held-out set for a calibration source ``spec``: procedural
    ``patterns`` beside photo crops, digits or noise; real ``photos`` (where scikit-learn is
    installed) beside ``patterns`` or the user's own folder or array."""
    from enginekit.quant.data import photos_available

    if spec in ("photos", "builtin", "synthetic"):
        return "patterns"
    return "photos" if photos_available() else "patterns"


def _judge_set(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], data: Any, labels: Any,
               config: OptimizeConfig) -> tuple[dict[str, Any], float]:
    """The comparison on one held-out set, and the agreement the budget counts there."""
    from enginekit.quant.gate import measure

    report = measure(reference, outputs, data, labels)
    judged = report["top1_agreement"]
    if config.tie_margin > 0:
        ref = reference["logits"]
        top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
        decided = (top2[:, 1] - top2[:, 0]) >= config.tie_margin * float(ref.std())
        same = outputs["logits"].argmax(1) == ref.argmax(1)
        report.update(tie_margin=config.tie_margin, ties=int((~decided).sum()),
                      top1_agreement_decided=float(same[decided].mean()) if decided.any() else 1.0)
        judged = report["top1_agreement_decided"]
    return report, judged


def judge(outcome: Outcome, references: Sequence[dict[str, np.ndarray]], sets: Sequence[Any], labels: Any,
           config: OptimizeConfig) -> None:
    """Measure the candidate against PyTorch on every held-out set; the budget holds when it
    holds on the worst of them. The top-level numbers are the worst set's."""
    from enginekit.api import load_runner
    from enginekit.quant.data import describe_data
    from enginekit.quant.gate import Budget, misses, run_all

    runner, _ = load_runner(outcome.path, device="cpu", backend=outcome.candidate.backend)
    with runner:
        outputs = [run_all(runner, data) for data in sets]
    per_set = [_judge_set(out, ref, data, labels, config) for out, ref, data in zip(outputs, references, sets)]
    budget = Budget(config.min_agreement, config.min_cosine)
    worst_agree = min(range(len(sets)), key=lambda i: per_set[i][1])
    worst_cos = min(range(len(sets)), key=lambda i: per_set[i][0]["logits_cosine"])
    first = per_set[0][0]
    report: dict[str, Any] = {
        "reference": "pytorch eager fp32",
        "inputs": " + ".join(d.source for d in sets),
        "samples": sum(d.size for d in sets),
        "top1_agreement": min(r["top1_agreement"] for r, _ in per_set),
        "logits_cosine": per_set[worst_cos][0]["logits_cosine"],
        "logits_max_abs": max(r["logits_max_abs"] for r, _ in per_set),
        "sets": [{"role": "held-out from the calibration source" if i == 0 else "second set, made differently",
                  "described": describe_data(d.source, d.size), **r} for i, (d, (r, _)) in enumerate(zip(sets,
                                                                                                           per_set))],
        "judged_on": {"agreement": sets[worst_agree].source, "cosine": sets[worst_cos].source},
    }
    for key in ("accuracy", "reference_accuracy"):
        if key in first:
            report[key] = first[key]
    if config.tie_margin > 0:
        report.update(tie_margin=config.tie_margin, ties=sum(r["ties"] for r, _ in per_set),
                      top1_agreement_decided=per_set[worst_agree][1])
    outcome.fidelity = {**report, "budget": budget.to_dict()}
    judged = {**report, "top1_agreement": per_set[worst_agree][1]}
    missed = []
    for m in misses(judged, budget):
        where = sets[worst_agree if "agreement" in m else worst_cos]
        m = m.replace("top-1 agreement", "top-1 agreement on decided samples") if config.tie_margin > 0 else m
        missed.append(f"{m} on {describe_data(where.source, where.size)}")
    outcome.status, outcome.reason = ("rejected", "; ".join(missed)) if missed else ("passed", "")
