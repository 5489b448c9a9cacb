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
