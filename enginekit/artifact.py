"""Artifact folders on disk: atomic writes, file hashing and integrity checks.

A stage writes into a hidden temporary sibling of the output folder and renames
it into place only after the manifest is written, so an interrupted stage
leaves nothing at the output path that :func:`enginekit.load` would accept.
The final rename never replaces a folder another writer published meanwhile
(unless ``overwrite``), and a temporary left by a process that is gone
(``kill -9``, a power cut) is removed by the next write to the same output.

Threat model of the verified-file cache (``$ENGINEKIT_CACHE_DIR/verified``):
a record lets a load skip re-hashing a file whose stat identity (device,
inode, size, mtime, ctime) is what it was when its sha256 last matched, and is
bound to that sha256 and to the digest of the manifest it was made for. It
protects against accidental change: an edit, a copy, a restore from backup, a
half-finished download, a manifest swapped for another artifact's, all of
which re-hash. Records live in an owner-only folder (0700) and a record or
folder that group or others can write, or that another user owns, is ignored
(as ssh ignores such key files). It does not protect against an attacker who
runs as the same user: whoever can rewrite the artifact and the cache can
forge a record. Against that, use ``ENGINEKIT_VERIFY=full`` (hash every file
every time), pin the manifest digest (``load(path, digest=...)``) or check a
signature (``load(path, verify_with=KEY)``, :mod:`enginekit.signing`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from enginekit.errors import ArtifactError, IntegrityError, one_line
from enginekit.manifest import MANIFEST_NAME, Component, FileEntry, Manifest, TensorSpec
from enginekit.outputs import check_output, disk_full, temporary_pattern, writer_gone, writer_tag

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
    "check_digest",
    "SIGNATURE_NAME",
]

#: The signature ``enginekit sign`` writes inside an artifact (not listed in the manifest).
SIGNATURE_NAME = "signature.sig"

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


def _remove_stale_temporaries(out: Path) -> None:
    """Remove ``.NAME.partial-*`` / ``.NAME.old-*`` siblings whose writing process (on this host) is gone."""
    pattern = temporary_pattern(out.name)
    with contextlib.suppress(OSError):
        for sibling in out.parent.iterdir():
            m = pattern.match(sibling.name)
            if m and writer_gone(m):
                shutil.rmtree(sibling, ignore_errors=True)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (even an empty folder).

    Linux's renameat2(RENAME_NOREPLACE) does it in one step; elsewhere (or on a
    filesystem without it) an exclusive ``mkdir`` claims the name first and the
    rename then replaces that empty folder, which only its maker can win.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    os.mkdir(dst)  # FileExistsError when another writer got there first
    try:
        os.rename(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise


@contextlib.contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool = False, *, inputs: Sequence[str | Path] = (),
                  marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``out_dir`` when the block succeeds.

    A block that raises (or is interrupted) leaves ``out_dir`` as it was and
    removes the temporary; an existing ``out_dir`` is an error unless
    ``overwrite``, and is then swapped out only after the new folder is complete.
    ``overwrite`` replaces only a folder that holds ``marker`` (or is empty), and no
    output may be, or hold, the current folder or one of ``inputs``
    (:func:`enginekit.outputs.check_output`, before anything is touched).
    Without ``overwrite`` the final rename is exclusive: of two writers racing
    for one ``out_dir`` exactly one publishes, the other gets an ArtifactError.
    Temporaries are named after the writing process (``.NAME.partial-HOST-PID-START-*``)
    so that a later write, or ``enginekit doctor --scan DIR --clean``, removes those
    whose process is gone. A full disk is one line naming the path.
    """
    check_output(out_dir, overwrite=overwrite, inputs=inputs, marker=marker)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a folder")
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another output or pass --overwrite")
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out)
        tag = f"{writer_tag()}-"
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{tag}", dir=out.parent))
        yield tmp
        _publish_modes(tmp)
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            if not overwrite:
                raise ArtifactError(
                    f"{out} appeared while this stage ran (another writer?) and was left as it is; "
                    "choose another output or pass --overwrite"
                ) from None
            check_output(out_dir, overwrite=True, inputs=inputs, marker=marker)  # what is there now
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{tag}", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException as exc:
        full = disk_full(exc, out, tmp) if isinstance(exc, Exception) and not isinstance(exc, ArtifactError) else None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from exc
        raise


@contextlib.contextmanager
def atomic_artifact(out_dir: str | Path, overwrite: bool = False, *,
                    inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """:func:`atomic_folder` for an artifact: the block must write ``manifest.json``, and
    ``overwrite`` replaces only an artifact folder (one holding a ``manifest.json``)."""
    with atomic_folder(out_dir, overwrite=overwrite, inputs=inputs, marker=MANIFEST_NAME) as tmp:
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


def _private(st: os.stat_result) -> bool:
    """Owned by this user and not writable by group or others (ssh's rule for its files)."""
    owner_ok = not hasattr(os, "geteuid") or st.st_uid == os.geteuid()
    return owner_ok and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _read_verified(root: Path, digest: str) -> dict[str, dict]:
    """The remembered checks for ``root`` made under the manifest with ``digest``; {} when
    there are none, or they cannot be trusted (another manifest, a folder or record others can write)."""
    try:
        path = _verified_path(root)
        if not (_private(path.parent.stat()) and _private(path.stat())):
            return {}
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("root") != str(root.resolve()) or record.get("manifest_sha256") != digest:
            return {}
        files = record["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):  # RuntimeError: no home
        return {}


def _private_dir(path: Path) -> None:
    """Create ``path`` (and a missing cache root) owner-only; an existing one keeps its mode."""
    for folder in (path.parent, path):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700, parents=folder is path.parent)


def _write_verified(root: Path, digest: str, files: dict[str, dict]) -> None:
    """Best effort, atomic: a record that cannot be written only costs the next load a re-hash."""
    try:
        path = _verified_path(root)
        _private_dir(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=path.parent)  # 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"root": str(root.resolve()), "manifest_sha256": digest, "files": files}, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError):
        with contextlib.suppress(Exception):
            os.unlink(tmp)  # type: ignore[possibly-undefined]


def check_digest(root: str | Path, manifest: Manifest, digest: str) -> None:
    """Refuse an artifact whose manifest digest (:meth:`Manifest.digest`, which covers
    every listed file's sha256) is not ``digest`` (hex, optionally ``sha256:``-prefixed)."""
    want = digest.strip().lower().removeprefix("sha256:")
    have = manifest.digest()
    if want != have:
        raise IntegrityError(f"{root}: manifest digest is sha256:{have}, expected sha256:{want} "
                             "(a different or edited artifact)")


def verify_artifact(root: str | Path, manifest: Manifest, full: bool | None = None) -> None:
    """Check every file the manifest lists: inside the folder, present, right size and sha256.

    Runs before any backend parses a file, so a tampered or truncated engine is
    reported as such rather than as a parser crash. Every file an engine reads
    must be listed: an ONNX graph's external-data files and an OpenVINO IR's
    ``.bin`` too, or the artifact is refused.

    A file whose sha256 matched is remembered with its stat identity (device,
    inode, size, mtime and ctime, as git's index does) under
    ``$ENGINEKIT_CACHE_DIR/verified``, bound to the manifest digest; the next
    check of the unchanged file skips the hashing, which is most of a large
    engine's load time. Any write, copy or replacement changes that identity
    and the file is hashed again (see the module docstring for what this does
    not protect against). ``full=True`` (or ``ENGINEKIT_VERIFY=full``) hashes
    every file regardless, as ``enginekit inspect`` does.
    """
    root = Path(root)
    if full is None:
        full = os.environ.get(VERIFY_ENV, "").lower() == "full"
    digest = manifest.digest()
    known = {} if full else _read_verified(root, digest)
    remember: dict[str, dict] = {}
    entry_reads = _entry_reads(manifest.kind)
    for comp in manifest.components.values():
        names = {f.path for f in comp.files}
        if comp.entry not in names:
            raise IntegrityError(f"{root}: component {comp.name!r} entry {comp.entry!r} is not in its file list")
        for entry in comp.files:
            _verify_file(root, entry, known, remember)
        for rel in sorted(names):
            if rel.endswith(".onnx") or (rel == comp.entry and entry_reads is None):
                needed = check_onnx_external_data(root, rel)
            elif rel == comp.entry and entry_reads is not None:
                needed = entry_reads(rel)
            else:
                continue
            for dep in needed:
                if dep not in names:
                    raise IntegrityError(f"{root}: {rel} reads {dep}, which component {comp.name!r} does not "
                                         "list in the manifest (unverified data)")
    for entry in manifest.assets:
        _verify_file(root, entry, known, remember)
    if remember != known:
        _write_verified(root, digest, remember)


def _entry_reads(kind: str) -> Any:
    """What a component's entry reads in an artifact of ``kind``: None where the entry is an
    ONNX graph (an export, or a backend that says its entries are ONNX: its external data is
    checked), else the backend's :meth:`~enginekit.engine.Backend.entry_companions` (a kind
    no registered backend writes: nothing the core knows of)."""
    from enginekit.registry import backend_for_kind

    owner = backend_for_kind(kind)
    if owner is None:
        return None if kind == "onnx" else (lambda entry: [])
    return None if owner.entry_format == "onnx" else owner.entry_companions


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


def check_onnx_external_data(root: Path, entry: str) -> list[str]:
    """The external-data files the ONNX graph ``entry`` reads, relative to ``root``
    (posix); refuse locations that leave the artifact folder. Read from the protobuf
    bytes (:mod:`enginekit.onnx_wire`): no ``onnx`` package on the runtime path."""
    from enginekit.onnx_wire import WireError, external_locations

    try:
        locations = external_locations(root / entry)
    except (WireError, OSError) as exc:
        raise IntegrityError(f"{root / entry}: not a readable ONNX model ({one_line(exc)})") from exc
    base = (root / entry).parent
    found: dict[str, None] = {}
    for location in locations:
        rel = os.path.normpath(os.path.relpath(base / location, root))
        _inside(root, rel)
        found[Path(rel).as_posix()] = None
    return list(found)


