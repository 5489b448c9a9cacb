"""Signing artifact folders with OpenSSF's ``model-signing`` (``pip install 'enginekit[sign]'``).

Private-key mode only, offline: :func:`sign_artifact` signs every file of the
folder (``manifest.json`` and the payload) with an elliptic-curve private key
(PEM) into ``signature.sig`` inside the artifact, a Sigstore bundle that is not
listed in the manifest and is left out of what is signed.
:func:`verify_signature` re-hashes the folder and checks the bundle against a
public key; a missing or invalid signature, a changed, missing or extra file,
or another key's signature is an :class:`~enginekit.errors.IntegrityError`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from enginekit.artifact import SIGNATURE_NAME, verify_artifact
from enginekit.errors import EngineKitError, IntegrityError, one_line
from enginekit.manifest import read_manifest

__all__ = ["sign_artifact", "verify_signature"]


def _library(purpose: str) -> Any:
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as exc:
        raise EngineKitError(
            f"{purpose} needs OpenSSF model-signing: pip install 'enginekit[sign]' ({exc})"
        ) from None
    return hashing, signing, verifying


def _hashing_config(hashing: Any) -> Any:
    # Paths are relative to the artifact folder; .git* files are signed like any other.
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False)


def sign_artifact(path: str | Path, private_key: str | Path, password: str | None = None) -> Path:
    """Verify the artifact at ``path`` in full, then sign it with ``private_key`` (EC, PEM);
    returns the signature file (``path/signature.sig``, replaced atomically)."""
    root = Path(path)
    manifest = read_manifest(root)
    verify_artifact(root, manifest, full=True)  # never sign a tampered folder
    key = Path(private_key)
    if not key.is_file():
        raise EngineKitError(f"{key}: no such private key file")
    hashing, signing, _ = _library("enginekit sign")
    fd, tmp = tempfile.mkstemp(prefix=f".{root.name}.sig-", dir=root.resolve().parent)
    os.close(fd)
    try:
        try:
            config = signing.Config().use_elliptic_key_signer(private_key=key, password=password)
            config.set_hashing_config(_hashing_config(hashing)).sign(root, tmp)
        except (ValueError, TypeError, OSError) as exc:
            raise EngineKitError(f"{root}: could not sign with {key}: {one_line(exc)}") from exc
        os.chmod(tmp, 0o644 & ~_umask())
        target = root / SIGNATURE_NAME
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def verify_signature(path: str | Path, public_key: str | Path) -> None:
    """Refuse the artifact at ``path`` unless its ``signature.sig`` verifies with ``public_key`` (PEM)."""
    root = Path(path)
    signature = root / SIGNATURE_NAME
    if not signature.is_file():
        raise IntegrityError(f"{root}: not signed (no {SIGNATURE_NAME}); sign it with: enginekit sign {root} --key KEY")
    key = Path(public_key)
    if not key.is_file():
        raise IntegrityError(f"{key}: no such public key file")
    hashing, _, verifying = _library("checking a signature")
    try:
        config = verifying.Config().use_elliptic_key_verifier(public_key=key)
        config.set_hashing_config(_hashing_config(hashing)).verify(root, signature)
    except Exception as exc:  # model-signing raises ValueError and parser errors of its dependencies
        raise IntegrityError(f"{root}: signature does not verify with {key}: {one_line(exc)}") from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
