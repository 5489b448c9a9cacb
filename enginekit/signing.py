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

__all__ = ["sign_artifact", "verify_signature", "signature_info", "key_fingerprint", "KEY_TYPES"]

#: The keys model-signing's private-key mode takes (what a refusal names).
KEY_TYPES = "elliptic-curve keys on P-256, P-384 or P-521 (PEM)"
_CURVES = ("secp256r1", "secp384r1", "secp521r1")


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
    _check_key(key, private=True, password=password)
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
    _check_key(key, private=False)
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


def _load_key(path: Path, private: bool, password: str | None = None) -> Any:
    from cryptography.hazmat.primitives import serialization

    data = path.read_bytes()
    if private:
        return serialization.load_pem_private_key(data, password.encode() if password else None)
    return serialization.load_pem_public_key(data)


def _check_key(path: Path, private: bool, password: str | None = None) -> None:
    """Refuse, in one line naming the key types taken, a key model-signing cannot use
    (it fails on an RSA key with an AttributeError of its own)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        return  # model-signing (which needs cryptography) is missing too: _library says so
    error = EngineKitError if private else IntegrityError
    try:
        key = _load_key(path, private, password)
    except (ValueError, TypeError, OSError) as exc:
        kind = "private" if private else "public"
        raise error(f"{path}: not a readable {kind} key ({_one_line(exc)}); enginekit takes {KEY_TYPES}") from None
    public = key.public_key() if private else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in _CURVES:
        what = public.curve.name if isinstance(public, ec.EllipticCurvePublicKey) else type(public).__name__
        what = what.removesuffix("PublicKey").removeprefix("_") or what
        raise error(f"{path}: the key is {what}; enginekit sign and --verify-with take {KEY_TYPES}")


def key_fingerprint(public_key: str | Path) -> str:
    """``sha256:HEX`` of the public key's PEM (SubjectPublicKeyInfo) form: the key hint
    model-signing records in a signature, so ``inspect`` can say which key signed."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    key = _load_key(Path(public_key), private=False)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"sha256:{hashlib.sha256(pem).hexdigest()}"


def signature_info(path: str | Path) -> dict[str, Any] | None:
    """What ``path/signature.sig`` claims, read without a key (nothing here is verified):
    ``{"key": "sha256:HEX" or None, "files": {relative path: sha256}}``; None when the
    artifact has no signature. A signature that cannot be parsed reports ``"error"``."""
    import base64
    import json

    signature = Path(path) / SIGNATURE_NAME
    if not signature.is_file():
        return None
    try:
        bundle = json.loads(signature.read_text(encoding="utf-8"))
        hint = ((bundle.get("verificationMaterial") or {}).get("publicKey") or {}).get("hint")
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        files = {str(r["name"]): str(r["digest"]) for r in statement["predicate"]["resources"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return {"key": None, "files": {}, "error": f"unreadable {SIGNATURE_NAME} ({_one_line(exc)})"}
    return {"key": f"sha256:{hint}" if hint else None, "files": files}
