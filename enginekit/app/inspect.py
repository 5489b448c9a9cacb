"""Readable views of a manifest (``enginekit inspect``) and of this machine (``enginekit doctor``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enginekit.manifest import Manifest

__all__ = ["artifact_report", "report_failures", "render_trust", "render_manifest", "doctor_report", "render_doctor"]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


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


def render_trust(report: dict[str, Any]) -> str:
    """The digest, pin and signature lines of the text view."""
    pin = report["pin"]
    pinned = {"match": f"pinned: matches {pin['expected']}", "mismatch": f"PIN MISMATCH: expected {pin['expected']}",
              "not pinned": "not pinned: pin it with NAME=PATH@" + report["digest"] + " (serve) or --digest"}[pin["verdict"]]
    sig = report["signature"]
    by = f" by key {sig['key']}" if sig["key"] else ""
    signed = {"unsigned": "not signed (enginekit sign ARTIFACT --key KEY.pem)",
              "unverified": f"signed{by}; not checked: pass --verify-with KEY.pub",
              "verified": f"signed{by}: verified",
              "failed": f"SIGNATURE FAILS{by}: {sig['detail']}"}[sig["verdict"]]
    return "\n".join([f"digest         {report['digest']}", f"pin            {pinned}", f"signature      {signed}"])


def render_manifest(manifest: Manifest, path: str | Path, verified: bool | str) -> Any:
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()

    def row(key: str, value: Any) -> None:
        head.add_row(key, escape(str(value)))  # labels and paths may hold [brackets]

    row("artifact", str(path))
    row("kind", manifest.kind)
    row("task", f"{manifest.task} ({manifest.family})")
    prov = manifest.provenance
    row("source", f"{prov.get('source', '?')}  [{prov.get('architecture', '')}]")
    if prov.get("weights"):
        row("weights", str(prov["weights"]))
    parent = prov.get("parent")
    if parent:
        row("parent", f"{parent.get('path')} ({parent.get('kind')}, manifest {parent.get('manifest_sha256', '')[:12]})")
    target = manifest.target
    if target:
        row("target", ", ".join(f"{k}={v}" for k, v in target.items()))
    if manifest.quantization:
        row("quantization", ", ".join(f"{k}={v}" for k, v in manifest.quantization.items()))
    if manifest.preprocessing:
        p = manifest.preprocessing
        row("preprocessing", ", ".join(f"{k}={v}" for k, v in p.items()))
    if manifest.labels:
        shown = ", ".join(manifest.labels[:10]) + (f", … ({len(manifest.labels)} in all)" if len(manifest.labels) > 10 else "")
        row("labels", shown)
    if manifest.task == "text-to-image" and manifest.task_config:
        t = manifest.task_config
        sched = (t.get("scheduler") or {}).get("_class_name", "?")
        row("pipeline", f"{t.get('pipeline')}: {len(t.get('text_encoders') or [])} text encoder(s), "
                        f"{t.get('latent_channels')}-channel latents at 1/{t.get('vae_scale_factor')}, "
                        f"VAE scaling {t.get('vae_scaling_factor')}, {t.get('prediction_type')} prediction, "
                        f"scheduler {sched}, default {int(t.get('sample_size', 0)) * int(t.get('vae_scale_factor', 0))} px")
    if manifest.fidelity:
        fid = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in manifest.fidelity.items()
               if not isinstance(v, (dict, list))}
        row("fidelity", ", ".join(f"{k}={v}" for k, v in fid.items()))
    tools = prov.get("tools") or {}
    if tools:
        row("tools", ", ".join(f"{k} {v}" for k, v in tools.items()))
    if isinstance(verified, str):  # a failed check's one line
        row("integrity", f"FAILED: {verified}")
    else:
        row("integrity", "every file matches its sha256" if verified else "not checked (--no-verify)")

    comps = Table(title="components", title_justify="left")
    for col in ("name", "precision", "inputs", "outputs", "files", "fidelity"):
        comps.add_column(col)
    for c in manifest.components.values():
        fmt = lambda specs: "\n".join(f"{s.name} {s.dtype}[{', '.join(map(str, s.shape))}]" for s in specs)  # noqa: E731
        files = "\n".join(f"{f.path} {_size(f.size)}" for f in c.files)
        precision = c.precision + (f"\n{c.quantization.get('method')}" if c.quantization else "")
        comps.add_row(*(escape(v) for v in (c.name, precision, fmt(c.inputs), fmt(c.outputs), files,
                                             _fidelity_cell(c.fidelity))))
    parts: list[Any] = [head, comps]
    if manifest.assets:
        assets = Table(title="assets", title_justify="left")
        assets.add_column("file")
        assets.add_column("size", justify="right")
        assets.add_column("sha256")
        for a in manifest.assets:
            assets.add_row(escape(a.path), _size(a.size), a.sha256[:16])
        parts.append(assets)
    return Group(*parts)


def _fidelity_cell(fid: Any) -> str:
    """The numbers a component's own parity check recorded: cosine and max abs first."""
    if not fid:
        return "-"
    keys = [k for k in fid if isinstance(fid[k], (int, float)) and not isinstance(fid[k], bool)]
    keys.sort(key=lambda k: (not k.endswith("cosine"), not k.endswith("max_abs"), k))
    return "\n".join(f"{k} {fid[k]:.6g}" for k in keys[:4]) or "-"


def doctor_report() -> dict[str, Any]:
    """What `doctor` shows, as data: hardware fingerprint and every registered backend."""
    from enginekit.hardware import fingerprint
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
        except Exception as exc:  # a broken third-party backend must not break doctor
            entry.update(installed=False, error=f"{type(exc).__name__}: {exc}")
        backends.append(entry)
    return {"hardware": fingerprint(), "backends": backends}


def render_doctor(report: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    hw = report["hardware"]
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("cpu", f"{hw.get('cpu_model')} ({hw.get('physical_cores')} cores, {hw.get('logical_cores')} threads)")
    head.add_row("isa", " ".join(hw.get("flags") or []) or "unknown")
    head.add_row("memory", _size(int(hw.get("memory_bytes") or 0)))
    gpus = hw.get("gpus") or []
    head.add_row("gpu", "; ".join(f"{g.get('name')} (cc {g.get('compute_capability')}, driver {g.get('driver')})" for g in gpus) or "none")
    head.add_row("os", f"{hw.get('os')}, python {hw.get('python')}")
    table = Table(title="backends", title_justify="left")
    for col in ("backend", "installed", "version", "devices", "install with"):
        table.add_column(col)
    for b in report["backends"]:
        table.add_row(
            b["name"],
            "yes" if b.get("installed") else "[red]no[/]",
            b.get("version") or "-",
            ", ".join(b.get("devices") or []) or "-",
            f"pip install 'enginekit[{b.get('extra', b['name'])}]'" if not b.get("installed") else "",
        )
    versions = Table(title="libraries", title_justify="left")
    versions.add_column("package")
    versions.add_column("version")
    for pkg, ver in sorted((hw.get("versions") or {}).items()):
        versions.add_row(pkg, ver)
    return Group(head, table, versions)
