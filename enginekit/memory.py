"""Resident memory of this process: its high-water mark, a span's peak, and the peak of each
stage of a job (what ``export``, ``compile`` and ``generate -v`` print at the end).

On Linux the kernel keeps the process's high-water mark of resident memory as ``VmHWM`` in
``/proc/self/status``, and writing ``5`` to ``/proc/self/clear_refs`` resets it to the current
resident size; a stage's peak is then exact, read when the stage ends. Where either is missing
(macOS, Windows, some sandboxes) a background thread samples the resident size every
:data:`SAMPLE_S` instead: a lower bound, and marked so (``how == "sampled"``).

Part of the core: psutil and the standard library only, no stage module.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Iterator

__all__ = ["SAMPLE_S", "HOW_TEXT", "vm_hwm_bytes", "rss_bytes", "reset_peak", "PeakRSS", "StagePeaks", "StagePeak",
           "gib", "release_file_pages", "ReleasingFilePages"]

#: The sampling period where the kernel keeps no resettable high-water mark (seconds).
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


def rss_bytes() -> int | None:
    """This process's resident size now; None where it cannot be read."""
    import psutil

    try:
        return int(psutil.Process().memory_info().rss)
    except psutil.Error:
        return None


def reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its resident size now (``/proc/self/clear_refs``);
    False where the kernel does not allow it here (then only sampling measures a span)."""
    if vm_hwm_bytes() is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def gib(n: int | None) -> str:
    """``"1.2 GiB"`` (``"0.14 GiB"`` under 1 GiB; ``"?"`` for None)."""
    return "?" if n is None else f"{n / 2**30:.{1 if n >= 2**30 else 2}f} GiB"


class PeakRSS:
    """The peak resident memory of this process over a span: ``with PeakRSS() as peak: ...;
    peak.bytes, peak.how``.

    ``reset=True`` resets ``VmHWM`` at the start (where the kernel allows it) and reads it at the
    end: the span's exact peak, but it also resets what anything else in the process would read
    as the high-water mark, so only a command that owns its process asks for it. Otherwise the
    span's peak is sampled by a thread (``how == "sampled"``); ``sample()`` takes one more
    sample now (a caller that knows its peak moment adds it). ``process=True`` reads the whole
    process's high-water mark instead (``VmHWM`` as it is: since the process started), falling
    back to sampling. Where ``VmHWM`` is read, the span is sampled too and the larger figure
    kept: the kernel's mark misses file-backed pages reclaimed without an unmap.
    """

    def __init__(self, reset: bool = False, process: bool = False, sample_s: float = SAMPLE_S) -> None:
        self.sample_s = sample_s
        self.bytes: int | None = None
        self._reset, self._process = reset, process
        self.how = "sampled"
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak(self) -> int:
        """The highest resident size seen so far (sampled; the final figure is :attr:`bytes`)."""
        return max(self._peak, self.bytes or 0)

    def sample(self) -> int:
        now = rss_bytes()
        if now is not None:
            self._peak = max(self._peak, now)
        return self._peak

    def _sampler(self) -> None:
        # Beside VmHWM the samples only catch slow file-backed peaks: every 0.1 s is enough, and a
        # denoising loop is not interrupted a hundred times a second for them.
        every = max(self.sample_s, 0.1) if self.how == "vmhwm" else self.sample_s
        while not self._stop.wait(every):
            self.sample()

    def __enter__(self) -> PeakRSS:
        if self._process and vm_hwm_bytes() is not None:
            self.how = "vmhwm"
        elif self._reset and reset_peak():
            self.how = "vmhwm"
        else:
            self.how = "sampled"
        # Sampled even where VmHWM is read: the kernel's high-water mark is updated lazily and
        # misses a peak of file-backed pages (memory-mapped weights) that reclaim takes back
        # without an unmap. Measured: a FLUX compile whose RSS was sampled at 17.4 GiB read 11.7.
        self.sample()
        self._thread = threading.Thread(target=self._sampler, name="enginekit-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        hwm = vm_hwm_bytes() if self.how == "vmhwm" else None
        if hwm is not None:
            self.sample()
            self.bytes = max(hwm, self._peak)
        else:
            self.sample()
            self.how, self.bytes = ("sampled", self._peak) if self._peak else ("unknown", None)


@dataclass(frozen=True)
class StagePeak:
    """One stage's peak resident memory (bytes; None when unknown), how it was read, and its time."""

    name: str
    bytes: int | None
    how: str
    seconds: float


class StagePeaks:
    """The peak resident memory of each stage of a job, in order: ``with peaks.stage("decode"): ...``.

    Stages are exact where ``VmHWM`` can be reset (each stage resets it, so a caller
    that uses this owns the process's high-water mark: a command, not a library call that a
    bench measures from outside), sampled otherwise. A stage that runs twice keeps its
    larger peak.
    """

    def __init__(self) -> None:
        self.stages: dict[str, StagePeak] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with PeakRSS(reset=True) as peak:
            yield
        self._record(StagePeak(name, peak.bytes, peak.how, time.perf_counter() - t0))

    def _record(self, got: StagePeak) -> None:
        with self._lock:
            had = self.stages.get(got.name)
            if had is not None:
                got = StagePeak(got.name, max(had.bytes or 0, got.bytes or 0) or None, got.how,
                                had.seconds + got.seconds)
            self.stages[got.name] = got

    @property
    def peak(self) -> int | None:
        """The largest stage peak (None when none is known)."""
        known = [s.bytes for s in self.stages.values() if s.bytes is not None]
        return max(known) if known else None

    def line(self) -> str:
        """``"peak RSS: text encoding 1.2 GiB, denoising 3.4 GiB, decode 0.9 GiB"``."""
        parts = [f"{s.name} {gib(s.bytes)}" for s in self.stages.values()]
        sampled = any(s.how != "vmhwm" for s in self.stages.values())
        return "peak RSS: " + ", ".join(parts) + (" (sampled: a lower bound)" if sampled else "")


_MADV_DONTNEED = 4  # <sys/mman.h>, the same on every Linux architecture


@functools.lru_cache(maxsize=1)
def _madvise() -> Any:
    """libc's ``madvise``, looked up once (the releasing thread calls it every quarter second)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def release_file_pages(paths: Iterable[str | Path]) -> int:
    """Drop this process's resident pages of the read-only memory maps of ``paths`` (files, or
    folders: every file under them); the bytes of mappings released, 0 where nothing matched
    or this is not Linux.

    A read-only file mapping's pages are the file's: ``madvise(MADV_DONTNEED)`` takes them out
    of this process (they stay in the page cache, the kernel's to keep or drop) and the next read
    of one maps it in again from the file, so the mapping's contents never change. It is how the
    OpenVINO paths give back the weights a library has mapped and is done reading (the ONNX data
    a conversion has copied into u4/u8 constants, the IR or cached blob the CPU plugin has
    repacked): resident file pages the process would otherwise carry at its peak. A mapping that
    is writable is never touched.
    """
    roots = [str(Path(p).resolve()) for p in paths]
    if not roots:
        return 0
    try:
        maps = Path("/proc/self/maps").read_text()
        madvise = _madvise()
    except (OSError, AttributeError):
        return 0
    released = 0
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or "w" in parts[1] or not parts[5].startswith("/"):
            continue
        path = parts[5].strip()
        if not any(path == r or path.startswith(r + "/") for r in roots):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if madvise(lo, hi - lo, _MADV_DONTNEED) == 0:
            released += hi - lo
    return released


class ReleasingFilePages:
    """While the block runs, every ``every`` seconds, and once more at its end: give back the
    resident pages of ``paths``' read-only maps (:func:`release_file_pages`). Around a call that
    reads mapped weights once and keeps its own copy (OpenVINO converting an ONNX model, its CPU
    plugin repacking weights on a first inference), the mapped pages no longer pile up beside the
    copy: the process peaks near the copy, not the copy and the file."""

    def __init__(self, paths: Iterable[str | Path], every: float = 0.25) -> None:
        self.paths = [Path(p) for p in paths]
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ReleasingFilePages:
        if self.paths:
            self._thread = threading.Thread(target=self._loop, name="release-file-pages", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            release_file_pages(self.paths)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            release_file_pages(self.paths)
