"""Measurement scripts: the commands behind the tables in docs/ and README.

Not part of the installed package. Run them from the repository root, e.g.
``python -m benchmarks.targets --work out/targets``; they use the installed
``enginekit`` library (``enginekit.bench`` for the harness).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root: a child process started by a script imports ``benchmarks`` from here.
ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that imports ``benchmarks``, plus ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
