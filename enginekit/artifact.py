"""Artifact folders on disk: atomic writes, file hashing and integrity checks.

A stage writes into a hidden temporary sibling of the output folder and renames
it into place only after the manifest is written, so an interrupted stage
leaves nothing at the output path that :func:`enginekit.load` would accept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from enginekit.errors import ArtifactError, IntegrityError
from enginekit.manifest import MANIFEST_NAME, Component, FileEntry, Manifest, TensorSpec

__all__ = [
    "cache_root",
    "using_cache_root",
    "sha256_file",
    "file_entry",
    "make_component",
    "make_assets",
    "atomic_folder",
    "atomic_artifact",
    "write_manifest",
    "verify_artifact",
    "check_onnx_external_data",
]

_CHUNK = 1 << 20

#: Where enginekit keeps what it can rebuild (compiled blobs, verified-file records).
CACHE_ENV = "ENGINEKIT_CACHE_DIR"
#: ``ENGINEKIT_VERIFY=full`` hashes every file on every load (no remembered checks).
VERIFY_ENV = "ENGINEKIT_VERIFY"
#: A file modified this close to the moment it was hashed is not remembered: a
#: change within the filesystem's timestamp granularity could keep its mtime
#: (git's "racily clean" case).
_RACY_S = 2.0


def cache_root() -> Path:
    """``$ENGINEKIT_CACHE_DIR``, else ``~/.cache/enginekit`` (not created here)."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "enginekit"


@contextlib.contextmanager
def using_cache_root(path: str | Path) -> Iterator[Path]:
    """Point :func:`cache_root` (and subprocesses started meanwhile) at ``path`` for the
    block, then restore what was set before."""
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(Path(path).resolve())
    try:
        yield Path(os.environ[CACHE_ENV])
    finally:
        if previous is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = previous


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> FileEntry:
    path = root / rel
    return FileEntry(path=rel, sha256=sha256_file(path), size=path.stat().st_size)


def make_component(
    root: Path,
    name: str,
    entry: str,
    files: Sequence[str],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    precision: str = "fp32",
    *,
    quantization: Mapping[str, Any] | None = None,
    fidelity: Mapping[str, Any] | None = None,
) -> Component:
    """Build a :class:`Component`, hashing each file under ``root``."""
    rels = list(dict.fromkeys([entry, *files]))
    return Component(
        name=name,
        entry=entry,
        files=tuple(file_entry(root, rel) for rel in rels),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        precision=precision,
        quantization=quantization,
        fidelity=dict(fidelity or {}),
    )


def make_assets(root: Path, rels: Sequence[str]) -> tuple[FileEntry, ...]:
    """Hash the non-engine files (tokenizers, scheduler config) under ``root`` as manifest assets."""
    return tuple(file_entry(root, rel) for rel in dict.fromkeys(rels))


def copy_assets(src: Path, dst: Path, manifest: Manifest) -> None:
    """Copy every asset of ``manifest`` from artifact ``src`` to the folder ``dst`` (a stage
    that rewrites the engines keeps the tokenizers and configs as they are)."""
    for entry in manifest.assets:
        target = dst / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(_inside(src, entry.path), target)


def write_manifest(root: Path, manifest: Manifest) -> None:
    (root / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")


def _publish_modes(root: Path) -> None:
    """mkdtemp (and some writers) leave owner-only modes; a published folder is
    ordinary: folders 0755 and files 0644, less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o755 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755 & ~umask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644 & ~umask)


@contextlib.contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``out_dir`` when the block succeeds.

    A block that raises (or is interrupted) leaves ``out_dir`` as it was and
    removes the temporary; an existing ``out_dir`` is an error unless
    ``overwrite``, and is then swapped out only after the new folder is complete.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another output or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _publish_modes(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_artifact(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """:func:`atomic_folder` for an artifact: the block must write ``manifest.json``."""
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        yield tmp
        if not (tmp / MANIFEST_NAME).is_file():
            raise ArtifactError(f"internal error: stage wrote no {MANIFEST_NAME} for {out_dir}")


def _inside(root: Path, rel: str) -> Path:
    """Resolve ``rel`` under ``root``; refuse paths that escape the folder."""
    root_resolved = root.resolve()
    if os.path.isabs(rel):
        raise IntegrityError(f"{root}: manifest names an absolute path {rel!r}")
    target = (root / rel).resolve()
    if root_resolved not in target.parents and target != root_resolved:
        raise IntegrityError(f"{root}: manifest path {rel!r} points outside the artifact folder")
    return target


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime cannot be set back by a user, so an edit that restores the mtime still shows.
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _verified_path(root: Path) -> Path:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32]
    return cache_root() / "verified" / f"{key}.json"


def _read_verified(root: Path) -> dict[str, dict]:
    try:
        record = json.loads(_verified_path(root).read_text(encoding="utf-8"))
        files = record["files"] if record.get("root") == str(root.resolve()) else {}
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):  # RuntimeError: no home folder
        return {}


def _write_verified(root: Path, files: dict[str, dict]) -> None:
    """Best effort, atomic: a record that cannot be written only costs the next load a re-hash."""
    try:
        path = _verified_path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"root": str(root.resolve()), "files": files}, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError):
        with contextlib.suppress(Exception):
            os.unlink(tmp)  # type: ignore[possibly-undefined]


def verify_artifact(root: str | Path, manifest: Manifest, full: bool | None = None) -> None:
    """Check every file the manifest lists: inside the folder, present, right size and sha256.

    Runs before any backend parses a file, so a tampered or truncated engine is
    reported as such rather than as a parser crash.

    A file whose sha256 matched is remembered with its stat identity (device,
    inode, size, mtime and ctime, as git's index does) under
    ``$ENGINEKIT_CACHE_DIR/verified``; the next check of the unchanged file skips
    the hashing, which is most of a large engine's load time. Any write, copy or
    replacement changes that identity and the file is hashed again. ``full=True``
    (or ``ENGINEKIT_VERIFY=full``) hashes every file regardless, as
    ``enginekit inspect`` does.
    """
    root = Path(root)
    if full is None:
        full = os.environ.get(VERIFY_ENV, "").lower() == "full"
    known = {} if full else _read_verified(root)
    remember: dict[str, dict] = {}
    for comp in manifest.components.values():
        names = {f.path for f in comp.files}
        if comp.entry not in names:
            raise IntegrityError(f"{root}: component {comp.name!r} entry {comp.entry!r} is not in its file list")
        for entry in comp.files:
            _verify_file(root, entry, known, remember)
        if comp.entry.endswith(".onnx"):
            check_onnx_external_data(root, comp.entry)
    for entry in manifest.assets:
        _verify_file(root, entry, known, remember)
    if remember != known:
        _write_verified(root, remember)


def _verify_file(root: Path, entry: FileEntry, known: dict[str, dict], remember: dict[str, dict]) -> None:
    """Check one listed file's presence, size and sha256 (skipped when its stat identity is remembered)."""
    path = _inside(root, entry.path)
    if not path.is_file():
        raise IntegrityError(f"{root}: {entry.path} is missing")
    before = path.stat()
    if before.st_size != entry.size:
        raise IntegrityError(
            f"{root}: {entry.path} is {before.st_size} bytes, the manifest says {entry.size} "
            "(truncated or replaced)"
        )
    seen = {"sha256": entry.sha256, "stat": _stat_key(before)}
    if known.get(entry.path) == seen:
        remember[entry.path] = seen
        return
    if sha256_file(path) != entry.sha256:
        raise IntegrityError(f"{root}: {entry.path} does not match its sha256 in the manifest (modified)")
    if _stat_key(path.stat()) == seen["stat"] and time.time() - before.st_mtime > _RACY_S:
        remember[entry.path] = seen


def check_onnx_external_data(root: Path, entry: str) -> None:
    """Refuse ONNX external-data locations that leave the artifact folder."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(root / entry), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others
        raise IntegrityError(f"{root / entry}: not a readable ONNX model ({exc})") from exc
    base = (root / entry).parent
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        rel = os.path.relpath(base / location, root)
        _inside(root, rel)
