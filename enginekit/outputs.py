"""Where a stage may write, and what it leaves behind when it cannot finish.

- :func:`check_output` refuses an output path that ``--overwrite`` must never
  replace: not an enginekit artifact (no ``manifest.json``), the input or a folder
  holding it, the current directory or a folder holding it, ``''`` and ``..``.
- :func:`disk_full` turns a write that ran out of space (ENOSPC, however a library
  wrapped it) into one line naming the path and the space it had.
- :func:`writer_tag` names a temporary after the process writing it (host, pid and
  the process's start time, so a reused pid is not mistaken for the writer);
  :func:`stale_partials` finds the temporaries whose writer is gone, for
  ``enginekit doctor --scan DIR [--clean]``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

from enginekit.errors import ArtifactError

__all__ = ["check_output", "disk_full", "stream_failure_note", "write_file", "writer_tag", "temporary_pattern",
           "writer_gone", "Partial",
           "stale_partials", "remove_partials", "partials_report"]


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _holds(folder: Path, path: Path) -> bool:
    """``folder`` is ``path`` or one of its parents (both resolved, symlinks followed)."""
    folder, path = folder.resolve(), path.resolve()
    return folder == path or folder in path.parents


def check_output(out: str | Path, *, overwrite: bool, inputs: Sequence[str | Path] = (),
                 marker: str | None = None) -> None:
    """Refuse, before anything is touched, an output a stage must not write or replace.

    Always refused: an empty path, one ending in ``.`` or ``..``, and a folder that is
    (or holds) the current directory or one of ``inputs``. With ``overwrite``, an
    existing folder is replaced only if it holds ``marker`` (an artifact's
    ``manifest.json``) or is empty: a folder of the user's own files never is."""
    text = str(out)
    if not text.strip():
        raise ArtifactError("the output path is empty; name a new folder (-o DIR)")
    if Path(text).name in ("", ".", "..") or text.rstrip("/\\").endswith(("/.", "/..")) or text in (".", ".."):
        raise ArtifactError(f"output {text!r} names the current folder or a parent; name a new folder (-o DIR)")
    path = _resolved(out)
    if os.path.lexists(path) and not path.is_dir():
        raise ArtifactError(f"{text} exists and is not a folder")
    if not overwrite and os.path.lexists(path):
        raise ArtifactError(f"{text} already exists; choose another output or pass --overwrite")
    cwd = Path.cwd()
    if _holds(path, cwd):
        raise ArtifactError(f"output {text!r} is the current folder or holds it; name a new folder (-o DIR)")
    for src in inputs:
        if src is not None and os.path.exists(src) and _holds(path, _resolved(src)):
            raise ArtifactError(f"output {text!r} is the input {str(src)!r} or holds it; "
                                "write to another folder (nothing was changed)")
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        raise ArtifactError(f"{text} is a link; --overwrite replaces only an enginekit output folder")
    if marker is not None and not (path / marker).is_file() and any(path.iterdir()):
        raise ArtifactError(f"{text} holds no {marker}: --overwrite replaces only an enginekit artifact folder, "
                            "never other files (nothing was changed)")


# ---------------------------------------------------------------------------- full disk

def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and what it wraps (its cause, else its context), at most 20 deep."""
    seen = 0
    while exc is not None and seen < 20:
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1


def _enospc(exc: BaseException | None) -> bool:
    return any((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
               or "no space left on device" in str(e).lower() for e in _chain(exc))


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


#: Less free space than this after a failed write: the disk filling was the failure.
_NEARLY_FULL = 256 * 1024
#: A C++ stream's failed write (OpenVINO's serializer says only "basic_ios::clear: iostream error")
#: with less than this free: a writer of large blocks fails on a block that does not fit, leaving
#: more than :data:`_NEARLY_FULL` behind.
_STREAM_FAILURE = ("iostream error", "basic_ios")
_LOW_FOR_STREAMS = 1024 * 1024 * 1024


def _stream_failure(exc: BaseException | None) -> bool:
    return any(s in str(e).lower() for e in _chain(exc) for s in _STREAM_FAILURE)


def disk_full(exc: BaseException, target: str | Path, written: str | Path | None = None) -> ArtifactError | None:
    """A one-line :class:`ArtifactError` when ``exc`` (or what it wraps) is a full disk at
    ``target``, or the failed write left its filesystem (nearly) full; else None.
    ``written``: the partial output, whose size tells how much was written before."""
    target = _resolved(target)
    free = _free_bytes(target.parent if not target.exists() else target)
    low = _LOW_FOR_STREAMS if _stream_failure(exc) else _NEARLY_FULL
    if not _enospc(exc) and (free is None or free >= low):
        return None
    done = _tree_bytes(Path(written)) if written is not None and os.path.isdir(written) else (
        os.path.getsize(written) if written is not None and os.path.isfile(written) else 0)
    need = f"; it needs more than the {_mb(done)} written before the disk filled" if done else ""
    have = f" ({_mb(free)} free)" if free is not None else ""
    return ArtifactError(f"no space left on device at {target}{have}{need}; nothing was written there")


def stream_failure_note(exc: BaseException, target: str | Path) -> str:
    """For a C++ stream's failed write (OpenVINO: "iostream error"), the space left at ``target``
    and what usually causes it (a write of a block larger than that space fails, and the space
    comes back when the partial file goes); "" for any other failure."""
    if not _stream_failure(exc):
        return ""
    target = _resolved(target)
    free = _free_bytes(target if target.exists() else target.parent)
    return (f" ({_mb(free)} free at {target} after the failed write: a full disk is the usual cause "
            "of this stream error)") if free is not None else ""


def _mb(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write one file through ``write(f)`` into a temporary beside ``path`` and rename it
    into place: an interrupted or failed write leaves no half-written file, a full disk
    is one line (:func:`disk_full`), and the file gets the ordinary mode (0644 less the
    umask), not mkstemp's owner-only 0600."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        full = disk_full(exc, path, tmp) if isinstance(exc, Exception) else None
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if full is not None:
            raise full from exc
        raise
    return path


# ---------------------------------------------------------------------------- stale temporaries

def _host_tag() -> str:
    # A temporary on a shared filesystem may belong to a live process on another host.
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux); 0 where unknown."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        return int(raw.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def writer_tag() -> str:
    """``HOST-PID-START``: who writes a temporary (START: the process's start time, 0 if unknown)."""
    pid = os.getpid()
    return f"{_host_tag()}-{pid}-{_start_time(pid)}"


def temporary_pattern(name: str | None = None) -> re.Pattern[str]:
    """``.NAME.partial-HOST-PID[-START]-RANDOM`` (and ``.old-``), for one output NAME or any."""
    stem = re.escape(name) if name is not None else ".+"
    return re.compile(rf"^\.(?P<name>{stem})\.(?P<kind>partial|old)-(?P<host>[0-9a-f]{{8}})-(?P<pid>\d+)-"
                      rf"(?:(?P<start>\d+)-)?[^-]*$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its folder
    return True


def writer_gone(match: re.Match[str]) -> bool | None:
    """True when the writer named by a :func:`temporary_pattern` match is gone (on this
    host: no such pid, or a pid now used by a process started at another time); None
    when it cannot be told (another host); False when it still runs."""
    if match.group("host") != _host_tag():
        return None
    pid = int(match.group("pid"))
    if pid == os.getpid():
        start = match.group("start")
        return bool(start) and start != "0" and int(start) != _start_time(pid)
    if not _pid_alive(pid):
        return True
    start = match.group("start")
    if start and start != "0":
        now = _start_time(pid)
        return bool(now) and now != int(start)
    return False


@dataclass(frozen=True)
class Partial:
    """A temporary a stage left: its path, size on disk, writer pid and whether the writer is gone."""

    path: Path
    bytes: int
    pid: int
    stale: bool | None  # None: written on another host, cannot tell


def _walk_partials(root: Path) -> Iterator[tuple[Path, re.Match[str]]]:
    pattern = temporary_pattern()
    for dirpath, dirnames, _ in os.walk(root):
        keep = []
        for name in dirnames:
            m = pattern.match(name)
            if m:
                yield Path(dirpath) / name, m
            elif not os.path.islink(os.path.join(dirpath, name)):
                keep.append(name)
        dirnames[:] = keep  # never descend into a temporary or follow a link


def stale_partials(roots: Iterable[str | Path], include_live: bool = False) -> list[Partial]:
    """The ``.partial-*`` / ``.old-*`` folders stages left under ``roots`` (searched
    recursively, links not followed) whose writer is gone; ``include_live`` adds those
    still being written and those from another host (``stale`` False / None)."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise ArtifactError(f"{root}: not a folder to scan")
        for path, m in _walk_partials(root):
            gone = writer_gone(m)
            if gone or include_live:
                found.append(Partial(path, _tree_bytes(path), int(m.group("pid")), gone))
    return found


def remove_partials(partials: Iterable[Partial]) -> list[Partial]:
    """Remove the stale ones among ``partials`` (the writer is gone, checked again now); return them."""
    removed = []
    for p in partials:
        m = temporary_pattern().match(p.path.name)
        if m and writer_gone(m):
            shutil.rmtree(p.path, ignore_errors=True)
            removed.append(p)
    return removed


def partials_report(roots: Sequence[str | Path], clean: bool = False) -> dict:
    """What ``enginekit doctor --scan DIR [--clean]`` reports: the stale temporaries under
    ``roots`` (path, bytes, writer pid) and, with ``clean``, which were removed."""
    found = stale_partials(roots)
    removed = {p.path for p in remove_partials(found)} if clean else set()
    return {"scanned": [str(r) for r in roots],
            "partials": [{"path": str(p.path), "bytes": p.bytes, "pid": p.pid, "removed": p.path in removed}
                         for p in found]}


def partials_lines(report: dict) -> list[str]:
    """The report of :func:`partials_report` as lines of text."""
    rows = report["partials"]
    if not rows:
        return [f"no stale partial folders under {', '.join(report['scanned'])}"]
    total = sum(r["bytes"] for r in rows)
    lines = [f"{len(rows)} stale partial folder(s), {_mb(total)} (their writer is gone):"]
    lines += [f"  {r['path']}  {_mb(r['bytes'])}  pid {r['pid']}" + ("  removed" if r["removed"] else "")
              for r in rows]
    if not any(r["removed"] for r in rows):
        lines.append("remove them with: enginekit doctor --scan DIR --clean")
    return lines
