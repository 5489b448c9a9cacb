"""``enginekit import``: a folder optimum wrote, checked and hashed into an enginekit artifact."""

from __future__ import annotations

from pathlib import Path

import click

from enginekit.app import render
from enginekit.app.cli.build import _stepper
from enginekit.app.cli.common import cli, emit_json, err_console


@cli.command(name="import")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path),
              help="Artifact folder to write: a copy of FOLDER with its manifest (files hard-linked where OUTPUT is "
                   "on the same filesystem).")
@click.option("--adopt", is_flag=True, help="Write manifest.json into FOLDER itself (and, where needed, a converted "
                                            "tokenizer under FOLDER/enginekit/); nothing else is touched.")
@click.option("--copy", "copy_files", is_flag=True, help="Copy every file into OUTPUT, never hard-link.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT (or, with --adopt, FOLDER's manifest) if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def import_cmd(folder: Path, out: Path | None, adopt: bool, copy_files: bool, overwrite: bool, as_json: bool) -> None:
    """Import a FOLDER written by optimum-cli (OpenVINO) or optimum's ONNX export: an SD 1.x/2.x,
    SDXL, SD3 or FLUX pipeline (model_index.json) or an image classifier (openvino_model.xml or
    model.onnx beside config.json and preprocessor_config.json).

    \b
    Every engine's inputs and outputs are read from the engine and every file is hashed, so
    `enginekit.load`, `generate`, `predict`, `bench` and `serve` run it as any artifact; the
    vendor's files are not rewritten (the manifest records how their tensor names meet
    enginekit's). Give -o OUTPUT for a copy, or --adopt to write the manifest in place.
    """
    from enginekit.export.importer import import_folder

    if copy_files and adopt:
        raise click.UsageError("--copy applies to -o OUTPUT, not --adopt")
    console = err_console()
    with console.status(f"importing {folder}") as status:
        manifest = import_folder(folder, out, adopt=adopt, overwrite=overwrite, link=not copy_files,
                                 on_step=_stepper(status))
    if as_json:
        emit_json(manifest.to_dict())
        return
    console.print(render.wrote_import(manifest, folder if adopt else out), highlight=False)
