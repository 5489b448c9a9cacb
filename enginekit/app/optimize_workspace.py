"""The work folder of one ``optimize`` run (classifier or pipeline)."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from enginekit.errors import FidelityError

__all__ = ["workspace", "refuse_without_pick"]


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


def refuse_without_pick(work: Path, out: Path, report: dict[str, Any], markdown: str, budget: str,
                        fates: list[str], extra: str = "") -> None:
    """No candidate kept the budget: the report (JSON and markdown) stays in ``work`` and a
    :class:`FidelityError` names each candidate's fate; nothing is written to ``out``."""
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (work / "report.md").write_text(markdown)
    lines = "\n".join(f"  {fate}" for fate in fates)
    raise FidelityError(f"no candidate {budget}:\n{lines}\n{extra}"
                        f"nothing was written to {out}; the report is in {work / 'report.md'}")
