"""Readable views of a manifest (``enginekit inspect``) and of this machine (``enginekit doctor``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enginekit.manifest import Manifest

__all__ = ["render_manifest", "doctor_report", "render_doctor"]


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_manifest(manifest: Manifest, path: str | Path, verified: bool) -> Any:
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
    if manifest.fidelity:
        fid = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in manifest.fidelity.items()}
        row("fidelity", ", ".join(f"{k}={v}" for k, v in fid.items()))
    tools = prov.get("tools") or {}
    if tools:
        row("tools", ", ".join(f"{k} {v}" for k, v in tools.items()))
    row("integrity", "every file matches its sha256" if verified else "not checked (--no-verify)")

    comps = Table(title="components", title_justify="left")
    for col in ("name", "precision", "inputs", "outputs", "files"):
        comps.add_column(col)
    for c in manifest.components.values():
        fmt = lambda specs: "\n".join(f"{s.name} {s.dtype}[{', '.join(map(str, s.shape))}]" for s in specs)  # noqa: E731
        files = "\n".join(f"{f.path} {_size(f.size)}" for f in c.files)
        comps.add_row(*(escape(v) for v in (c.name, c.precision, fmt(c.inputs), fmt(c.outputs), files)))
    return Group(head, comps)


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
