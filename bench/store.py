"""A JSON-lines results store: one bench record per line, appended, never rewritten.

Each machine appends to its own file; ``read_results(["results/"])`` reads a
folder of them for a report across hardware.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from enginekit.bench.harness import RECORD_SCHEMA
from enginekit.errors import InputError

__all__ = ["ResultsStore", "read_results"]

log = logging.getLogger("enginekit")


class ResultsStore:
    """Records in one ``.jsonl`` file. :attr:`skipped` counts the lines the last
    :meth:`read` passed over (not JSON, not an object, or another schema)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.skipped = 0

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append ``records`` in one ``write`` on an ``O_APPEND`` descriptor, then fsync:
        concurrent writers never interleave inside a batch, and a crash loses whole lines."""
        data = "".join(json.dumps(dict(r), sort_keys=True, allow_nan=True) + "\n" for r in records).encode()
        if not data:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        """Every valid record in file order; [] when the file does not exist yet."""
        self.skipped = 0
        if not self.path.exists():
            return []
        records = []
        with self.path.open("r", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    self.skipped += 1
                    continue
                if not isinstance(rec, dict) or rec.get("schema") != RECORD_SCHEMA:
                    self.skipped += 1
                    continue
                records.append(rec)
        if self.skipped:
            log.warning("%s: skipped %d line(s) that are not schema-%d records", self.path, self.skipped, RECORD_SCHEMA)
        return records


def read_results(paths: str | Path | Iterable[str | Path]) -> list[dict[str, Any]]:
    """Records from files and folders (every ``*.jsonl`` in a folder, sorted by name), in order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records: list[dict[str, Any]] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(p.glob("*.jsonl"))
        elif p.is_file():
            files = [p]
        else:
            raise InputError(f"{p}: no such results file or folder")
        for f in files:
            records.extend(ResultsStore(f).read())
    return records
