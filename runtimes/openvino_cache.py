"""OpenVINO's model cache: one folder of compiled blobs per artifact, kept under a size cap.

The folder is ``$ENGINEKIT_CACHE_DIR/openvino/<digest16>`` (default
``~/.cache/enginekit/openvino/<digest16>``), keyed by the manifest digest; each load marks its
folder as used, and past ``ENGINEKIT_CACHE_MAX_GB`` the folders of the artifacts loaded longest
ago are removed.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from enginekit.artifact import cache_root
from enginekit.manifest import Manifest

__all__ = ["CACHE_MAX_ENV", "DEFAULT_CACHE_MAX_GB", "cache_dir_for", "low_memory_config", "make_cache_dir", "prune_cache"]

log = logging.getLogger(__name__)


def cache_dir_for(manifest: Manifest) -> Path:
    """Where compiled blobs of this artifact are cached (not created here)."""
    return cache_root() / "openvino" / manifest.digest()[:16]


#: The model cache's size cap in GiB (``ENGINEKIT_CACHE_MAX_GB``; 0: no cap). Past it, the folders
#: of the artifacts loaded longest ago are removed (never the one being loaded): each is rebuilt
#: by the next load that needs it.
CACHE_MAX_ENV = "ENGINEKIT_CACHE_MAX_GB"
DEFAULT_CACHE_MAX_GB = 20.0


def make_cache_dir(manifest: Manifest) -> Path | None:
    """Create the cache folder, marked as used now, and keep the cache under its cap; None when
    it cannot be written (load then runs uncached)."""
    try:
        path = cache_dir_for(manifest)
        path.mkdir(parents=True, exist_ok=True)
        os.utime(path)
    except (OSError, RuntimeError):  # RuntimeError: Path.home() without a home
        return None
    if not os.access(path, os.W_OK):
        return None
    prune_cache(path.parent, keep=path)
    return path


def _cache_cap_bytes() -> int | None:
    raw = os.environ.get(CACHE_MAX_ENV, "")
    try:
        gb = float(raw) if raw.strip() else DEFAULT_CACHE_MAX_GB
    except ValueError:
        log.warning("%s=%r is not a number of GiB; using %s", CACHE_MAX_ENV, raw, DEFAULT_CACHE_MAX_GB)
        gb = DEFAULT_CACHE_MAX_GB
    return None if gb <= 0 else int(gb * 2**30)


def prune_cache(root: Path, keep: Path | None = None, max_bytes: int | None = -1) -> list[Path]:
    """Remove the least recently used artifact folders under ``root`` (the model cache) until
    it holds at most ``max_bytes`` (default: the ``ENGINEKIT_CACHE_MAX_GB`` cap); ``keep`` is
    never removed. Returns the folders removed. Best effort: a folder another process is
    writing may be removed, and OpenVINO rebuilds its blob at that load."""
    cap = _cache_cap_bytes() if max_bytes == -1 else max_bytes
    if cap is None:
        return []
    entries = []
    try:
        for folder in root.iterdir():
            if not folder.is_dir() or folder.is_symlink():
                continue
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
            entries.append((folder.stat().st_mtime, folder, size))
    except OSError:
        return []
    total = sum(size for _, _, size in entries)
    removed = []
    for _, folder, size in sorted(entries, key=lambda e: e[0]):
        if total <= cap:
            break
        if keep is not None and folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        removed.append(folder)
    if removed:
        log.info("model cache over %.1f GiB: removed %d least recently used folder(s)", cap / 2**30, len(removed))
    return removed


def low_memory_config() -> dict[str, Any]:
    """Compile settings added for the least resident memory (``load(..., low_memory=True)``).

    None at present: memory-mapped weights (``ENABLE_MMAP``) are in every load's config (see
    :meth:`enginekit.runtimes.openvino.OpenVINOBackend._config`), since a setting here would change the model cache's key
    and a low-memory load would compile its own blob instead of reading the one ``compile``
    wrote. Measured with ``bench/low_memory_rss.py``: ``ENABLE_MMAP`` leaves the peak RSS as it
    is (a compile reads every weight either way) but keeps the weights the CPU plugin uses in
    place file-backed: compiling a 0.41 GB T5 alone left 0.31 GiB anonymous and 0.45 GiB
    file-backed with it, 0.69 and 0.06 GiB without; file-backed pages are the kernel's to drop
    and read again under memory pressure, anonymous ones have nowhere to go without swap. The
    model is compiled from its path (as every load does), so no ``ov.Model`` copy of the weights
    is held beside the compiled one, and a model-cache hit skips reading the IR.
    """
    return {}
