"""``inspect``, ``sign``, ``doctor`` and ``demo``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from enginekit.app import render
from enginekit.app.cli.common import cli, emit_json, err_console


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print the digest, integrity, pin and signature verdicts and the manifest, as JSON.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Hash every file and check it against its sha256 (a full check: no remembered result is used).")
@click.option("--digest", help="Check the artifact against this pinned manifest digest (sha256:HEX).")
@click.option("--verify-with", type=click.Path(path_type=Path), help="Check the signature with this public key (PEM).")
def inspect(artifact: Path, as_json: bool, verify: bool, digest: str | None, verify_with: Path | None) -> None:
    """Show what an ARTIFACT's manifest says, readably, its digest, and whether it is
    intact, pinned and signed (pin it with `serve NAME=PATH@sha256:HEX`, `predict/generate
    --digest` or `enginekit.load(path, digest=...)`). Exits 1 when a check fails."""
    from enginekit.app.inspect import artifact_report, report_failures
    from enginekit.manifest import Manifest

    report = artifact_report(artifact, verify=verify, digest=digest, verify_with=verify_with)
    failures = report_failures(report)
    if as_json:
        emit_json(report)
    else:
        console = render.stdout_console()
        integrity = report["integrity"]
        verified = integrity["detail"] if integrity["verdict"] == "failed" else integrity["verdict"] == "ok"
        console.print(render.render_manifest(Manifest.from_dict(report["manifest"]), artifact, verified=verified))
        console.print(render.render_trust(report), highlight=False, soft_wrap=True, markup=False)
    if failures:
        raise click.ClickException(failures[0])


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path), help="Elliptic-curve private key (PEM).")
@click.option("--password", default=None, help="The private key's password, if it has one.")
def sign(artifact: Path, key: Path, password: str | None) -> None:
    """Sign ARTIFACT with OpenSSF model-signing (private-key mode, offline): writes
    ARTIFACT/signature.sig; check it with `--verify-with KEY.pub` or `load(..., verify_with=)`."""
    from enginekit.signing import sign_artifact

    target = sign_artifact(artifact, key, password=password)
    err_console().print(f"[green]signed[/] {escape(str(artifact))}  ({escape(target.name)})")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--scan", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
              help="Also list stale .partial-* folders under DIR (their writer is gone).")
@click.option("--clean", is_flag=True, help="Remove the stale folders --scan finds.")
def doctor(as_json: bool, scan: tuple[Path, ...], clean: bool) -> None:
    """Hardware, installed backends and their devices, library versions."""
    from enginekit.app.inspect import doctor_report
    from enginekit.outputs import partials_lines, partials_report

    if clean and not scan:
        raise click.ClickException("--clean removes what --scan DIR finds; give --scan DIR")
    report = doctor_report()
    if scan:
        report["partials"] = partials_report(scan, clean=clean)
        click.echo("\n".join(partials_lines(report["partials"])), err=as_json)
    if as_json:
        emit_json(report)
        return
    render.stdout_console().print(render.render_doctor(report))


@cli.command()
@click.option("-o", "--output", "out", default=Path("out/demo"), show_default=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def demo(out: Path, as_json: bool) -> None:
    """The main job on the built-in digits ViT: export, compile for every
    installed backend, classify the held-out digits, and print a table."""
    from enginekit.app.demo import run_demo

    rows = run_demo(out, on_step=render.step_printer(err_console()))
    if as_json:
        emit_json(rows)
    else:
        render.stdout_console().print(render.render_demo(rows))
