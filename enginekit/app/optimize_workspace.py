"""The work folder of one ``optimize`` run (classifier or pipeline)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from enginekit.errors import FidelityError

__all__ = ["workspace"]


@contextlib.contextmanager
def workspace(out: Path, work_dir: str | Path | None) -> Iterator[Path]:
    """``work_dir`` (kept) or a temporary folder beside ``out`` (removed at the end, but kept
    when no candidate passes: the report of why lives there). The candidates' compiled blobs
    go to a model cache inside it and leave with it (a dozen blobs of a large model would
    otherwise pile up in the user's cache); on success only the pick is compiled into this
    machine's cache."""
    from enginekit.api import warm_cache
    from enginekit.artifact import using_cache_root

    out.parent.mkdir(parents=True, exist_ok=True)
    keep = work_dir is not None
    work = Path(work_dir) if keep else Path(tempfile.mkdtemp(prefix=f".{out.name}.optimize-", dir=out.parent))
    work.mkdir(parents=True, exist_ok=True)
    try:
        with using_cache_root(work / "model-cache"):
            yield work
    except FidelityError:
        keep = True
        raise
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    warm_cache(out, "cpu")
