"""Every rich table and status line the CLI prints, in one place.

Each function takes the library's data (a manifest, a report, records) and
returns a rich renderable or a line of console markup. Anything that came from
the user or a file (paths, labels, names, messages, install hints with
``[extras]``) is escaped, so rich neither eats brackets nor shows markup that
was meant as styling.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape

__all__ = [
    "stdout_console", "step_printer", "size_text", "wrote_export", "wrote_compile", "wrote_quantize",
    "render_manifest", "pipeline_details", "render_doctor", "render_demo", "predict_table", "evaluate_table",
    "bench_table", "optimize_report_table", "optimize_table", "optimize_pipeline_table", "fate_lines", "rebuild_lines",
]


def stdout_console(width: int = 200) -> Any:
    """The console for tables on stdout: piped output has no terminal width, so keep whole cells."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else width)


def step_printer(console: Any) -> Callable[[str], None]:
    """``on_step`` for a long command: a dim dot, then the library's message as plain text."""
    return lambda msg: console.print(f"[dim]·[/] {escape(msg)}", highlight=False)


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _bytes(manifest: Any) -> int:
    return sum(f.size for c in manifest.components.values() for f in c.files)


def wrote_export(manifest: Any, out: Path) -> str:
    """The line ``export`` ends with: the parity numbers its check recorded (an export quantized
    for a backend after it, ``--weight-format`` with ``-b``: the quantize gate's)."""
    if (manifest.quantization or {}).get("backend"):
        return wrote_quantize(manifest, out)
    fid = manifest.fidelity
    if "logits_cosine" in fid:
        return (f"[green]wrote[/] {escape(str(out))}  ({escape(str(manifest.provenance.get('architecture')))}, "
                f"parity vs PyTorch: logits max abs {fid['logits_max_abs']:.2e}, cosine {fid['logits_cosine']:.6f})")
    peak = manifest.provenance.get("peak_rss_bytes")
    if manifest.provenance.get("streamed"):
        checked = [c.fidelity["min_cosine"] for c in manifest.components.values() if c.fidelity.get("checked")]
        return (f"[green]wrote[/] {escape(str(out))}  ({manifest.family}: {', '.join(manifest.components)}; "
                + (f"weights streamed, checked block by block vs PyTorch: worst cosine {min(checked):.6f}"
                   if checked else "weights streamed, not checked against PyTorch")
                + (f"; peak memory {peak / 2**30:.1f} GiB" if peak else "") + ")")
    worst = min((c.fidelity.get("min_cosine", 1.0) for c in manifest.components.values()), default=1.0)
    weights = (manifest.quantization or {}).get("weight_format")
    image = fid.get("image") or (fid.get("export") or {}).get("image")  # compressed: the float export's check
    return (f"[green]wrote[/] {escape(str(out))}  ({manifest.family}: {', '.join(manifest.components)}; "
            + (f"weights {', '.join(f'{n} {c.precision}' for n, c in manifest.components.items())}; "
               if weights else "")
            + f"parity vs PyTorch: worst component cosine {worst:.6f}"
            + (f", image {image['psnr_db']:.1f} dB vs diffusers ({image['steps']} steps, {image['width']} px)"
               if image else "")
            + (f"; peak memory {peak / 2**30:.1f} GiB" if peak else "") + ")")


def wrote_compile(manifest: Any, out: Path) -> str:
    precisions = ", ".join(sorted({c.precision for c in manifest.components.values()}))
    fused = manifest.target.get("transformer_fusions")
    return (f"[green]wrote[/] {escape(str(out))}  ({manifest.kind}, {len(manifest.components)} component(s), "
            f"{precisions}, device {manifest.target.get('device')}"
            + (f"; fused {', '.join(f'{n} {k}' for k, n in fused['fused'].items()) or 'nothing'}, "
               f"max abs {fused['check'].get('logits_max_abs', 0):.1e} vs unfused"
               if fused and "fused" in fused else "") + ")")


def wrote_import(manifest: Any, out: Path | None) -> str:
    """The line ``import`` ends with: what was found, what it became, and the digest that pins it."""
    imported = manifest.provenance.get("imported", {})
    adapted = [n for n, c in manifest.components.items() if c.interface]
    return (f"[green]imported[/] {escape(str(imported.get('from')))}: {escape(str(imported.get('found')))} -> "
            f"{manifest.family} {manifest.task}, {len(manifest.components)} component(s)"
            + (f" ({', '.join(adapted)} under enginekit's tensor names)" if adapted else "")
            + f"\n[green]wrote[/] {escape(str(out))}  ({imported.get('mode')}; digest sha256:{manifest.digest()})")


def wrote_quantize(manifest: Any, out: Path) -> str:
    """The line ``quantize`` ends with: the gate's numbers against the float parent."""
    fid = manifest.fidelity
    size = _bytes(manifest) / 1e6
    if "vs_parent" in fid:  # an image gate
        plan = ", ".join(f"{n} {d['method']}" for n, d in manifest.quantization["components"].items())
        vs_d = fid.get("vs_diffusers")
        extra = f"; vs diffusers {vs_d['psnr_db']:.2f} dB" if vs_d else ""
        return (f"[green]wrote[/] {escape(str(out))}  ({plan}; {size:.1f} MB; worst gate image vs the float parent: "
                f"PSNR {fid['vs_parent']['psnr_db']:.2f} dB, SSIM {fid['vs_parent']['ssim']:.4f}{extra})")
    from enginekit.quant.data import describe_data

    acc = f", accuracy {fid['accuracy']:.4f} (float {fid['reference_accuracy']:.4f})" if "accuracy" in fid else ""
    kept = manifest.quantization.get("excluded_nodes") or []
    return (f"[green]wrote[/] {escape(str(out))}  ({manifest.quantization['method']}, {size:.1f} MB; vs the float "
            f"parent: agreement {fid['top1_agreement']:.4f}, cosine {fid['logits_cosine']:.5f}{acc} on "
            f"{escape(describe_data(fid.get('inputs', ''), fid['samples']))}"
            f"{f'; {len(kept)} nodes kept in float' if kept else ''})")


def pipeline_details(manifest: Any) -> list[tuple[str, str]]:
    """``inspect``'s rows for a text-to-image pipeline (routed by the task registry)."""
    t = manifest.task_config
    if not t:
        return []
    sched = (t.get("scheduler") or {}).get("_class_name", "?")
    return [("pipeline", f"{t.get('pipeline')}: {len(t.get('text_encoders') or [])} text encoder(s), "
                         f"{t.get('latent_channels')}-channel latents at 1/{t.get('vae_scale_factor')}, "
                         f"VAE scaling {t.get('vae_scaling_factor')}, {t.get('prediction_type')} prediction, "
                         f"scheduler {sched}, default "
                         f"{int(t.get('sample_size', 0)) * int(t.get('vae_scale_factor', 0))} px")]


def _head_rows(manifest: Any, path: str | Path, verified: bool | str) -> list[tuple[str, Any]]:
    from enginekit.stages import details

    prov = manifest.provenance
    rows: list[tuple[str, Any]] = [("artifact", str(path)), ("kind", manifest.kind),
                                   ("task", f"{manifest.task} ({manifest.family})"),
                                   ("source", f"{prov.get('source', '?')}  [{prov.get('architecture', '')}]")]
    if prov.get("weights"):
        rows.append(("weights", str(prov["weights"])))
    parent = prov.get("parent")
    if parent:
        rows.append(("parent", f"{parent.get('path')} ({parent.get('kind')}, manifest "
                               f"{parent.get('manifest_sha256', '')[:12]})"))
    for key, section in (("target", manifest.target), ("quantization", manifest.quantization),
                         ("preprocessing", manifest.preprocessing)):
        if section:
            rows.append((key, ", ".join(f"{k}={v}" for k, v in section.items())))
    if manifest.labels:
        more = f", … ({len(manifest.labels)} in all)" if len(manifest.labels) > 10 else ""
        rows.append(("labels", ", ".join(manifest.labels[:10]) + more))
    rows += details(manifest)
    if manifest.fidelity:
        fid = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in manifest.fidelity.items()
               if not isinstance(v, (dict, list))}
        rows.append(("fidelity", ", ".join(f"{k}={v}" for k, v in fid.items())))
    tools = prov.get("tools") or {}
    if tools:
        rows.append(("tools", ", ".join(f"{k} {v}" for k, v in tools.items())))
    if isinstance(verified, str):  # a failed check's one line
        rows.append(("integrity", f"FAILED: {verified}"))
    else:
        rows.append(("integrity", "every file matches its sha256" if verified else "not checked (--no-verify)"))
    return rows


def render_manifest(manifest: Any, path: str | Path, verified: bool | str) -> Any:
    """``inspect``: the manifest's fields, its components and its assets."""
    from rich.console import Group
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    for key, value in _head_rows(manifest, path, verified):
        head.add_row(key, escape(str(value)))  # labels and paths may hold [brackets]
    comps = Table(title="components", title_justify="left")
    for col in ("name", "precision", "inputs", "outputs", "files", "fidelity"):
        comps.add_column(col)
    for c in manifest.components.values():
        # An imported engine's tensor under the name the task reads it by: "pooler_output ... (as pooled)".
        task_names = {engine: task for side in ("inputs", "outputs")
                      for task, engine in (c.interface.get(side) or {}).items()}
        rows = set(c.interface.get("one_row") or ())

        def fmt(specs: Any, task_names: dict = task_names, rows: set = rows) -> str:
            return "\n".join(f"{s.name} {s.dtype}[{', '.join(map(str, s.shape))}]"
                             + (f" (as {task_names[s.name]})" if s.name in task_names else "")
                             + (" (one row for the batch)" if s.name in rows else "") for s in specs)

        files = "\n".join(f"{f.path} {size_text(f.size)}" for f in c.files)
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
            assets.add_row(escape(a.path), size_text(a.size), a.sha256[:16])
        parts.append(assets)
    return Group(*parts)


def _fidelity_cell(fid: Any) -> str:
    """The numbers a component's own parity check recorded: cosine and max abs first."""
    if not fid:
        return "-"
    keys = [k for k in fid if isinstance(fid[k], (int, float)) and not isinstance(fid[k], bool)]
    keys.sort(key=lambda k: (not k.endswith("cosine"), not k.endswith("max_abs"), k))
    return "\n".join(f"{k} {fid[k]:.6g}" for k in keys[:4]) or "-"


def render_doctor(report: Mapping[str, Any]) -> Any:
    """``doctor``: this machine, the registered backends (with the extra that installs each), versions."""
    from rich.console import Group
    from rich.table import Table

    hw = report["hardware"]
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    gpus = hw.get("gpus") or []
    for key, value in (
        ("cpu", f"{hw.get('cpu_model')} ({hw.get('physical_cores')} cores, {hw.get('logical_cores')} threads)"),
        ("isa", " ".join(hw.get("flags") or []) or "unknown"),
        ("memory", size_text(int(hw.get("memory_bytes") or 0))),
        ("gpu", "; ".join(f"{g.get('name')} (cc {g.get('compute_capability')}, driver {g.get('driver')})"
                          for g in gpus) or "none"),
        ("os", f"{hw.get('os')}, python {hw.get('python')}"),
    ):
        head.add_row(key, escape(str(value)))
    table = Table(title="backends", title_justify="left")
    for col in ("backend", "installed", "version", "devices", "install with"):
        table.add_column(col)
    for b in report["backends"]:
        hint = f"pip install 'enginekit[{b.get('extra', b['name'])}]'" if not b.get("installed") else ""
        hint = b.get("reason") or hint
        table.add_row(escape(b["name"]), "yes" if b.get("installed") else "[red]no[/]",
                      escape(b.get("version") or "-"), escape(", ".join(b.get("devices") or []) or "-"), escape(hint))
    gpu = Table(title="gpu path", title_justify="left")
    for col in ("part", "usable", "version, or why not"):
        gpu.add_column(col)
    for row in report.get("gpu") or []:
        gpu.add_row(escape(row["name"]), "yes" if row.get("usable") else "[red]no[/]", escape(str(row.get("detail"))))
    versions = Table(title="libraries", title_justify="left")
    versions.add_column("package")
    versions.add_column("version")
    for pkg, ver in sorted((hw.get("versions") or {}).items()):
        versions.add_row(escape(pkg), escape(str(ver)))
    return Group(head, table, gpu, versions)


def render_demo(rows: Sequence[Mapping[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="enginekit demo: built-in digits ViT, held-out digits")
    for col, justify in (("engine", "left"), ("device", "left"), ("batch-1 latency (ms)", "right"),
                         ("accuracy", "right"), ("images", "right")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(escape(r["engine"]), escape(r["device"]), f"{r['latency_ms_batch1']:.3f}",
                      f"{r['accuracy']:.4f}", str(r["images"]))
    return table


def predict_table(title: str, results: Sequence[tuple[Path, Any, str | None]], top_k: int) -> Any:
    """``predict``: one row per image read (skipped files are listed apart)."""
    from rich.table import Table

    table = Table(title=escape(title))
    table.add_column("image", overflow="fold")
    table.add_column("label")
    table.add_column("score", justify="right")
    if top_k > 1:
        table.add_column(f"top {top_k}")
    for path, pred, err in results:
        if err is not None:
            continue
        row = [escape(str(path)), escape(pred.label), f"{pred.score:.4f}"]
        if top_k > 1:
            row.append(escape(", ".join(f"{lbl} {s:.3f}" for lbl, s in pred.top_k)))
        table.add_row(*row)
    return table


def evaluate_table(artifact: Path, report: Mapping[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=escape(f"{artifact} ({report['method']}) on {report['samples']} samples"))
    table.add_column("measure")
    table.add_column("value", justify="right")
    names = {"accuracy": "accuracy", "reference_accuracy": "float parent accuracy",
             "top1_agreement": "top-1 agreement with float", "logits_cosine": "logits cosine",
             "logits_max_abs": "logits max abs error"}
    for key, label in names.items():
        if key in report:
            table.add_row(label, f"{report[key]:.5g}")
    table.add_row("data", escape(str(report["inputs"])))
    return table


def _bench_row(r: Mapping[str, Any], parts: bool, inflight: bool, rss: bool, nodes: bool) -> list[str]:
    lat = r["latency_ms"]
    cos = r["fidelity"].get("logits_cosine")
    cond = r.get("conditions") or {}
    ratio = cond.get("p99_over_p50")
    return [escape(r["engine"]["name"]), *((escape(r.get("part") or "-"),) if parts else ()),
            escape(r["engine"]["method"]), str(r["batch"]),
            *((str(cond.get("requests") or 1),) if inflight else ()), f"{lat['p50']:.2f}",
            f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", f"{ratio:.2f}" if ratio else "-",
            f"{r['throughput_ips']:.1f}",
            f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
            f"{r['load_ms']:.0f}" if r["load_ms"] is not None else "-",
            f"{r['first_inference_ms']:.1f}" if r["first_inference_ms"] is not None else "-",
            *((f"{r['peak_rss_bytes'] / 1e6:.0f}" if r.get("peak_rss_bytes") else "-",) if rss else ()),
            f"{(r['size_bytes'] or 0) / 1e6:.1f}", f"{cos:.5f}" if cos is not None else "-",
            *((escape(f"{r['node']['hostname']} {r['node']['node_id'][:8]}"),) if nodes else ())]


def bench_table(records: Sequence[Mapping[str, Any]], store: Path) -> Any:
    """``bench``: one row per record (a part of a pipeline, or a classifier at one batch size)."""
    from rich.table import Table

    table = Table(title=f"appended {len(records)} records to {escape(str(store))}")
    parts = any(r.get("part") for r in records)
    rss = any(r.get("peak_rss_bytes") for r in records)
    inflight = any((r.get("conditions") or {}).get("mode") == "throughput" for r in records)
    nodes = any(r.get("node") for r in records)
    for col in ("engine", *(("part",) if parts else ()), "method", "batch", *(("in flight",) if inflight else ()),
                "p50 ms", "p90 ms", "p99 ms", "p99/p50", "fps" if inflight else "img/s",
                "speed-up", "load ms", "first ms", *(("peak MB",) if rss else ()), "size MB", "cosine",
                *(("node",) if nodes else ())):
        table.add_column(col, justify="left" if col in ("engine", "part", "method", "node") else "right")
    for r in records:
        table.add_row(*_bench_row(r, parts, inflight, rss, nodes))
    return table


_FATES = {"picked": "[bold green]picked[/]", "passed": "passed", "rejected": "[yellow]rejected[/]",
          "failed": "[red]failed[/]"}


def optimize_table(report: Mapping[str, Any]) -> Any:
    """``optimize`` of a classifier: every candidate's speed and fidelity, and its fate."""
    from rich.table import Table

    from enginekit.quant.data import describe_data

    base = report["baseline"]
    labelled = "accuracy" in base["fidelity"]
    data = report.get("data") or {}
    judged = " and ".join(describe_data(d["source"], d["size"]) for d in (data.get("held_out"), data.get("second")) if d)
    table = Table(title=f"enginekit optimize {escape(report['model'])}: batch {report['batch']}, budget agreement >= "
                        f"{report['budget']['min_agreement']}, cosine >= {report['budget']['min_cosine']} on "
                        f"each of {escape(judged)}")
    both = " (held-out / second)" if data.get("second") else ""
    cols = ["candidate", "precision", "p50 ms", "speed-up", "agreement" + both, "cosine" + both]
    for col in [*cols, *(["accuracy"] if labelled else []), "fate"]:
        table.add_column(col, justify="left" if col in ("candidate", "precision", "fate") else "right")

    def cells(name: str, precision: str, rec: Mapping[str, Any] | None, fid: Mapping[str, Any], fate: str) -> list[str]:
        lat = (rec or {}).get("latency_ms") or {}
        speed = (rec or {}).get("speedup")
        sets = fid.get("sets") or [fid]
        row = [escape(name), escape(precision), f"{lat['p50']:.2f}" if lat else "-",
               f"{speed:.2f}x" if speed else "-",
               (" / ".join(f"{s['top1_agreement']:.4f}" for s in sets)
                + (f" ({fid['top1_agreement_decided']:.4f})" if "top1_agreement_decided" in fid else ""))
               if "top1_agreement" in fid else "-",
               " / ".join(f"{s['logits_cosine']:.5f}" for s in sets) if "logits_cosine" in fid else "-"]
        if labelled:
            row.append(f"{fid['accuracy']:.4f}" if "accuracy" in fid else "-")
        return [*row, fate]

    table.add_row(*cells("pytorch eager", "fp32", {**base, "speedup": 1.0}, base["fidelity"], "baseline"))
    for c in report["candidates"]:
        table.add_row(*cells(c["candidate"]["name"], c["candidate"]["precision"], c["record"], c["fidelity"],
                             _FATES.get(c["status"], escape(c["status"]))))
    return table


def optimize_pipeline_table(report: Mapping[str, Any]) -> Any:
    """``optimize`` of a pipeline: every candidate assembly's step time and image PSNR, and its fate."""
    from rich.table import Table

    from enginekit.app.optimize_pipeline_report import HEADERS, table_rows

    table = Table(title=f"enginekit optimize {escape(report['model'])}: {report['size']}x{report['size']}, "
                        f"{report['steps']} steps, budget PSNR >= {report['budget']['min_psnr_db']:g} dB vs diffusers")
    for col in HEADERS:
        table.add_column(col, justify="left" if col in ("candidate", "precision", "fate") else "right")
    for row in table_rows(report):
        table.add_row(*(escape(cell) for cell in row))
    return table


def optimize_report_table(report: Mapping[str, Any]) -> Any:
    """The table of an ``optimize`` report, classifier or pipeline (told by its budget)."""
    if "min_psnr_db" in report["budget"]:
        return optimize_pipeline_table(report)
    return optimize_table(report)


def fate_lines(report: Mapping[str, Any]) -> list[str]:
    """Why each rejected or failed candidate was (console markup)."""
    if "min_psnr_db" in report["budget"]:
        return []  # the pipeline table has a fate column with the reason
    return [f"[dim]{escape(c['candidate']['name'])}: {c['status']}: {escape(str(c['reason']))}[/]"
            for c in report["candidates"] if c["status"] in ("rejected", "failed")]


def rebuild_lines(report: Mapping[str, Any]) -> str | None:
    """The commands that rebuild the pick by hand (plain text: print it with markup off)."""
    if not report.get("rebuild"):
        return None
    return "rebuild it by hand:\n" + "\n".join(f"  {line}" for line in report["rebuild"])


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
