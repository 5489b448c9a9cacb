"""Measurement scripts: the commands behind the tables in docs/ and README.

Not part of the installed package. Run them from the repository root, e.g.
``python -m benchmarks.targets --work out/targets``; they use the installed
``enginekit`` library (``enginekit.bench`` for the harness).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The repository root: a child process started by a script imports ``benchmarks`` from here.
ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that imports ``benchmarks``, plus ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@dataclass
class Watched:
    """A child run under :func:`run_watched`: its exit code, the process tree's polled peak RSS,
    why it was killed (None when it was not) and its wall time."""

    returncode: int | None
    peak_rss_bytes: int
    killed: str | None
    seconds: float


def _tree_rss(proc: Any) -> int:
    """Resident bytes of ``proc`` and its children (0 once it is gone)."""
    import psutil

    total = 0
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in family:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_watched(cmd: list[str], rss_limit_bytes: float, *, timeout_s: float | None = None,
                env: dict[str, str] | None = None, stdout: Any = None, stderr: Any = None,
                poll_s: float = 0.1) -> Watched:
    """Run ``cmd`` in its own process group under a watchdog in this process: the tree's RSS is
    polled every ``poll_s`` and the group killed past ``rss_limit_bytes`` or ``timeout_s``.
    ``stdout``/``stderr`` are passed to Popen (give files, not pipes: nothing reads them meanwhile)."""
    import signal
    import subprocess
    import time

    import psutil

    started = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    proc = psutil.Process(child.pid)
    peak, why = 0, None
    while child.poll() is None:
        peak = max(peak, _tree_rss(proc))
        if peak > rss_limit_bytes:
            why = f"killed by the watchdog: RSS {peak / 2**30:.1f} GiB passed {rss_limit_bytes / 2**30:.1f} GiB"
        elif timeout_s is not None and time.perf_counter() - started > timeout_s:
            why = f"killed after {timeout_s:.0f} s"
        if why:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        time.sleep(poll_s)
    child.wait()
    return Watched(child.returncode, peak, why, time.perf_counter() - started)
