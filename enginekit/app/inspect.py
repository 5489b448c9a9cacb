"""What ``enginekit doctor`` reports about this machine, as data (tables: :mod:`enginekit.app.render`)."""

from __future__ import annotations

from typing import Any

from pathlib import Path

from enginekit.manifest import Manifest

__all__ = ["artifact_report", "report_failures", "doctor_report"]


def artifact_report(path: str | Path, *, verify: bool = True, digest: str | None = None,
                    verify_with: str | Path | None = None) -> dict[str, Any]:
    """What ``enginekit inspect --json`` prints: the artifact's digest, the integrity verdict,
    the pin and signature states, and the manifest. The shape is stable::

        {"artifact": PATH, "digest": "sha256:HEX",
         "integrity": {"verdict": "ok" | "failed" | "not checked", "detail": str | null},
         "pin": {"expected": "sha256:HEX" | null, "verdict": "match" | "mismatch" | "not pinned"},
         "signature": {"verdict": "unsigned" | "unverified" | "verified" | "failed",
                       "key": "sha256:HEX" | null, "changed": [PATH, ...], "detail": str | null},
         "manifest": {...}}

    ``integrity`` hashes every listed file (no remembered check). ``pin`` compares the
    digest with ``digest``. ``signature.key`` is the fingerprint of the key that signed
    (``sha256`` of its public PEM, as model-signing records it), read from the signature
    without a key; ``changed`` lists the files whose bytes differ from what was signed (or
    that were added since), also without a key; ``verify_with`` checks the signature
    itself ("verified" or "failed"). Without it, an intact signature reads "unverified".
    """
    from enginekit.artifact import check_digest, verify_artifact
    from enginekit.errors import IntegrityError
    from enginekit.manifest import read_manifest

    root = Path(path)
    manifest = read_manifest(root)
    have = f"sha256:{manifest.digest()}"
    integrity: dict[str, Any] = {"verdict": "not checked", "detail": None}
    if verify:
        try:
            verify_artifact(root, manifest, full=True)
            integrity["verdict"] = "ok"
        except IntegrityError as exc:
            integrity = {"verdict": "failed", "detail": str(exc)}
    pin: dict[str, Any] = {"expected": None, "verdict": "not pinned"}
    if digest is not None:
        pin["expected"] = f"sha256:{digest.strip().lower().removeprefix('sha256:')}"
        try:
            check_digest(root, manifest, digest)
            pin["verdict"] = "match"
        except IntegrityError:
            pin["verdict"] = "mismatch"
    return {"artifact": str(root), "digest": have, "integrity": integrity, "pin": pin,
            "signature": _signature_state(root, manifest, verify_with, trusted=integrity["verdict"] == "ok"),
            "manifest": manifest.to_dict()}


def _signature_state(root: Path, manifest: Manifest, verify_with: str | Path | None, trusted: bool) -> dict[str, Any]:
    from enginekit.artifact import SIGNATURE_NAME, sha256_file
    from enginekit.errors import EngineKitError
    from enginekit.manifest import MANIFEST_NAME
    from enginekit.signing import signature_info, verify_signature

    info = signature_info(root)
    if info is None:
        state: dict[str, Any] = {"verdict": "unsigned", "key": None, "changed": [], "detail": None}
        if verify_with is not None:
            state.update(verdict="failed", detail=f"{root}: not signed (no {SIGNATURE_NAME})")
        return state
    state = {"verdict": "unverified", "key": info["key"], "changed": [], "detail": info.get("error")}
    if "error" in info:
        state["verdict"] = "failed"
        return state
    # The listed files' sha256 are known once the integrity check passed; others are hashed.
    listed = {e.path: e.sha256 for c in manifest.components.values() for e in c.files}
    listed.update({e.path: e.sha256 for e in manifest.assets})
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    present.discard(SIGNATURE_NAME)
    changed = []
    for name in sorted(present | set(info["files"])):
        if name not in present or name not in info["files"]:
            changed.append(name)
            continue
        now = listed[name] if trusted and name in listed and name != MANIFEST_NAME else sha256_file(root / name)
        if now != info["files"][name]:
            changed.append(name)
    state["changed"] = changed
    if changed:
        state.update(verdict="failed", detail=f"changed since it was signed: {', '.join(changed[:5])}"
                                               + (f" and {len(changed) - 5} more" if len(changed) > 5 else ""))
    if verify_with is not None:
        try:
            verify_signature(root, verify_with)
            state.update(verdict="verified", detail=None)
        except EngineKitError as exc:
            state.update(verdict="failed", detail=str(exc))
    return state


def report_failures(report: dict[str, Any]) -> list[str]:
    """The report's refusals, one line each (empty when nothing failed)."""
    out = []
    if report["integrity"]["verdict"] == "failed":
        out.append(report["integrity"]["detail"])
    if report["pin"]["verdict"] == "mismatch":
        out.append(f"{report['artifact']}: manifest digest is {report['digest']}, expected {report['pin']['expected']} "
                   "(a different or edited artifact)")
    if report["signature"]["verdict"] == "failed":
        out.append(f"{report['artifact']}: signature: {report['signature']['detail']}")
    return out




def doctor_report() -> dict[str, Any]:
    """What `doctor` shows, as data: hardware fingerprint and every registered backend."""
    from enginekit.hardware import fingerprint, gpu_stack
    from enginekit.registry import backend_class, backend_names

    backends = []
    for name in backend_names():
        entry: dict[str, Any] = {"name": name}
        try:
            cls = backend_class(name)
            entry["installed"] = cls.is_available()
            entry["version"] = cls.version()
            entry["extra"] = cls.extra
            entry["devices"] = cls().devices() if entry["installed"] else []
            reason = cls.unavailable_reason() if hasattr(cls, "unavailable_reason") else None
            if reason:
                entry["reason"] = reason
        except Exception as exc:  # a broken third-party backend must not break doctor
            entry.update(installed=False, error=f"{type(exc).__name__}: {exc}")
        backends.append(entry)
    return {"hardware": fingerprint(), "backends": backends, "gpu": gpu_stack() + _ort_providers()}


def _ort_providers() -> list[dict[str, Any]]:
    """ONNX Runtime's GPU execution providers, each usable or why not (doctor's GPU rows)."""
    import importlib.util

    from enginekit.hardware import fingerprint

    if importlib.util.find_spec("onnxruntime") is None:
        return [{"name": "onnxruntime providers", "usable": False, "detail": "onnxruntime is not installed"}]
    import onnxruntime

    have = onnxruntime.get_available_providers()
    gpu = bool(fingerprint()["gpus"])
    rows = []
    for name, needs in (("CUDAExecutionProvider", "onnxruntime-gpu"),
                        ("TensorrtExecutionProvider", "onnxruntime-gpu and TensorRT's libraries")):
        if name not in have:
            detail = f"not in this onnxruntime build ({', '.join(have)}): install {needs}"
        else:
            detail = "present" + ("" if gpu else "; no CUDA GPU here to run it")
        rows.append({"name": f"onnxruntime {name}", "usable": name in have and gpu, "detail": detail})
    return rows
