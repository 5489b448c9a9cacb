"""A process's own peak resident memory, for the bench's "peak MB" column.

On Linux the kernel keeps each process's high-water mark of resident memory as
``VmHWM`` in ``/proc/<pid>/status``. A process started with ``exec`` (what
``subprocess`` does) gets a fresh address space, so its ``VmHWM`` counts only what it
touched itself. ``getrusage().ru_maxrss`` is not that: on exec the kernel folds the
old address space's high-water mark into it, and a child forked from a parent holding
1 GB reports 1 GB whatever it does (a forked child that does not exec also starts
with the parent's pages resident, so its RSS is no better). The bench therefore times
each engine in a fresh ``exec``-ed process and reads ``VmHWM`` there.

Where ``/proc`` has no ``VmHWM`` (macOS, Windows, some sandboxes), the peak is the
largest RSS sampled every :data:`SAMPLE_S` by a background thread while the work
ran: a lower bound, and marked so (``how == "sampled"``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

import psutil

__all__ = ["SAMPLE_S", "PeakMemory", "vm_hwm_bytes", "HOW_TEXT"]

#: The sampling period of the fallback (seconds).
SAMPLE_S = 0.01
#: How each method reads, for notes and reports.
HOW_TEXT = {
    "vmhwm": "the process's high-water mark (VmHWM)",
    "sampled": f"the largest RSS sampled every {SAMPLE_S * 1e3:g} ms (no VmHWM here): a lower bound",
    "unknown": "unknown (neither VmHWM nor RSS could be read)",
}


def vm_hwm_bytes(pid: int | str = "self") -> int | None:
    """``VmHWM`` of process ``pid`` from ``/proc/<pid>/status`` in bytes; None where it is missing."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024  # the kernel writes kB
    return None


class PeakMemory:
    """This process's peak resident memory while the context is open (and, with ``VmHWM``,
    since the process started): ``with PeakMemory() as peak: ...; peak.bytes, peak.how``.

    ``how`` is ``"vmhwm"`` (read from ``/proc/self/status`` at exit), ``"sampled"`` (the
    largest RSS a background thread saw) or ``"unknown"`` (neither could be read; ``bytes`` None).
    """

    def __init__(self, sample_s: float = SAMPLE_S) -> None:
        self.sample_s = sample_s
        self.bytes: int | None = None
        self.how = "vmhwm" if vm_hwm_bytes() is not None else "sampled"
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        proc = psutil.Process()
        while True:
            try:
                self._samples.append(proc.memory_info().rss)
            except psutil.Error:
                return
            if self._stop.wait(self.sample_s):
                return

    def __enter__(self) -> PeakMemory:
        if self.how == "sampled":
            self._thread = threading.Thread(target=self._sample, name="enginekit-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        hwm = vm_hwm_bytes() if self.how == "vmhwm" else None
        if hwm is not None:
            self.bytes = hwm
        elif self._samples:
            self.how, self.bytes = "sampled", max(self._samples)
        else:
            self.how, self.bytes = "unknown", None
