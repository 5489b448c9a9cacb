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

The readers live in the core (:mod:`enginekit.memory`), which the runtime and the
build commands share; this module keeps the bench's names.
"""

from __future__ import annotations

from enginekit.memory import HOW_TEXT, SAMPLE_S, PeakRSS, vm_hwm_bytes

__all__ = ["SAMPLE_S", "PeakMemory", "vm_hwm_bytes", "HOW_TEXT"]


class PeakMemory(PeakRSS):
    """This process's peak resident memory while the context is open (and, with ``VmHWM``,
    since the process started): ``with PeakMemory() as peak: ...; peak.bytes, peak.how``.

    ``how`` is ``"vmhwm"`` (read from ``/proc/self/status`` at exit), ``"sampled"`` (the
    largest RSS a background thread saw) or ``"unknown"`` (neither could be read; ``bytes`` None).
    """

    def __init__(self, sample_s: float = SAMPLE_S) -> None:
        super().__init__(process=True, sample_s=sample_s)
