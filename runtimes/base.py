"""Runtime helpers over the contract in :mod:`enginekit.engine` (re-exported here,
where every backend module has always imported it from)."""

from __future__ import annotations

import numpy as np

from enginekit.engine import Backend, BackendOptions, CompileOptions, Runner, validate_feeds

__all__ = ["Runner", "Backend", "BackendOptions", "CompileOptions", "run_batched", "validate_feeds"]


def run_batched(runner: Runner, values: np.ndarray, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Run ``values`` (N, ...) through a single-input ``runner`` in slices; concatenate outputs by name.

    Slices are ``batch_size`` rows (all N at once when None), except that an
    engine built for a fixed batch B always gets exactly B rows: the last slice
    is padded by repeating its final row, and the padding's outputs are dropped.
    """
    name = runner.inputs[0].name
    fixed = runner.inputs[0].shape[0] if runner.inputs[0].shape else None
    fixed = fixed if isinstance(fixed, int) and fixed > 0 else None
    n = len(values)
    step = fixed or batch_size or max(n, 1)
    if step >= n and (fixed is None or n == fixed):
        return runner.run({name: values})
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, step):
        chunk = values[start : start + step]
        keep = len(chunk)
        if fixed is not None and keep < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - keep, axis=0)])
        for key, value in runner.run({name: chunk}).items():
            parts.setdefault(key, []).append(value[:keep])
    return {key: np.concatenate(v) for key, v in parts.items()}
