"""``inspect``, ``sign``, ``doctor`` and ``demo``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from enginekit.app import render
from enginekit.app.cli.common import cli, emit_json, err_console


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Hash every file and check it against its sha256 (a full check: no remembered result is used).")
def inspect(artifact: Path, as_json: bool, verify: bool) -> None:
    """Show what an ARTIFACT's manifest says, readably, and its digest
    (pin it with `enginekit predict/generate --digest` or `enginekit.load(path, digest=...)`)."""
    from enginekit.artifact import SIGNATURE_NAME, verify_artifact
    from enginekit.manifest import read_manifest

    manifest = read_manifest(artifact)
    if verify:
        verify_artifact(artifact, manifest, full=True)
    if as_json:
        emit_json(manifest.to_dict())
        return
    console = render.stdout_console()
    console.print(render.render_manifest(manifest, artifact, verified=verify))
    signed = f"signed: {SIGNATURE_NAME}, check it with --verify-with KEY" if (artifact / SIGNATURE_NAME).is_file() \
        else "not signed"
    console.print(f"digest         sha256:{manifest.digest()}  ({signed})", highlight=False, soft_wrap=True)


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
