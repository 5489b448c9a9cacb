"""``enginekit optimize``: the fastest engine for a model that keeps its fidelity."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from enginekit.app import render
from enginekit.app.cli.common import cli, csv, emit_json, err_console, given_params


@cli.command()
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Folder for the picked engine (with report.md and report.json).")
@click.option("--budget-agreement", type=float, default=0.99, show_default=True,
              help="Least top-1 agreement with PyTorch on the held-out samples.")
@click.option("--budget-cosine", type=float, default=0.999, show_default=True,
              help="Least mean cosine between the engine's logits and PyTorch's.")
@click.option("--tie-margin", type=float, default=0.0, show_default=True,
              help="Count held-out samples whose PyTorch top-2 logit gap is under this many standard deviations "
                   "of the logits as ties, left out of the agreement budget (both agreements are reported).")
@click.option("--backends", help="Comma-separated backends to try (default: every installed one).")
@click.option("--precisions", help="Precision families to try; fp16 includes bf16 [default: fp32,fp16,int8,int4].")
@click.option("--batch", default=1, show_default=True, help="Batch size to pick the engine for.")
@click.option("--data", help="Calibration and held-out data: an image folder, an .npy, 'photos', 'patterns' or "
                             "'builtin' (default: builtin for the built-in model, photos otherwise).")
@click.option("--second-data", help="A second, differently made held-out set every candidate must also keep the "
                                    "budget on (default: 'patterns' beside photos or builtin, 'photos' beside "
                                    "your own data).")
@click.option("--calibration-size", default=64, show_default=True,
              help="Samples static int8 methods calibrate on, at most (never the held-out ones).")
@click.option("--eval-size", default=128, show_default=True, help="Held-out samples the budget is checked on.")
@click.option("--runs", type=int, default=None, help="Timed runs per candidate (default 30).")
@click.option("--duration", type=float, default=None,
              help="Or: seconds of timed runs per candidate (pipelines: at most this long repeating images "
                   "for time per candidate [default: 20]).")
@click.option("--warmup", default=5, show_default=True, help="Untimed runs before each timing.")
@click.option("--threads", default=0, show_default=True, help="Threads for every engine and PyTorch (0: defaults).")
@click.option("--dynamic-shape", is_flag=True, help="Keep OpenVINO engines' batch axis dynamic (slower at batch 1).")
@click.option("--random-weights", is_flag=True, help="timm:NAME only: the real architecture with seeded weights.")
@click.option("--weights", type=click.Path(path_type=Path), help="timm:NAME only: a .safetensors file to load.")
@click.option("--revision", help="Hub revision for a hub id.")
@click.option("--seed", default=0, show_default=True, help="Seed for random weights and the export's parity inputs.")
@click.option("--work", type=click.Path(path_type=Path), help="Keep the export and every candidate here.")
@click.option("--store", type=click.Path(path_type=Path), help="Also append the timing records to this results store.")
@click.option("--min-psnr", type=float, default=None,
              help="Pipelines: least image PSNR (dB) against diffusers on every held-out image [default: 30].")
@click.option("--size", type=int, default=None, help="Pipelines: image side judged and timed (default: the model's).")
@click.option("--steps", type=int, default=None, help="Pipelines: denoising steps per image [default: 4].")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Pipelines: held-out prompts, one a line (default: built-in ones no quantizer calibrates on).")
@click.option("--seeds", default=None, help="Pipelines: comma-separated latent seeds per prompt [default: 0].")
@click.option("--no-t5", "without_t5", is_flag=True,
              help="SD3/SD3.5 pipelines: export and judge without the T5 encoder (as `export --no-t5`).")
@click.option("--streaming", is_flag=True,
              help="Pipelines: export streamed, one block's weights in memory at a time (as `export --streaming`: "
                   "full-size SDXL, SD3.5, FLUX); a streamed UNet has no DeepCache output, so its default caches "
                   "are TaylorSeer's.")
@click.option("--caches", default=None,
              help="Pipelines: step caches tried on the fastest assembly within the budget, judged by the same "
                   "image gate ('none' tries none) [default: deepcache:2,deepcache:3 for a UNet, "
                   "taylorseer:2,taylorseer:3 for a transformer].")
@click.option("--token-merge", default=None, metavar="R[,R...]",
              help="ViT classifiers: also try merging R token pairs per block (ToMe) on every candidate that "
                   "passes, judged by the same budget against the unmerged model (an export per R).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def optimize(ctx: click.Context, model: str, out: Path, prompts_file: Path | None, seeds: str | None,
             backends: str | None, precisions: str | None, as_json: bool, **_: Any) -> None:
    """Find the fastest engine for MODEL on this machine that keeps its fidelity.

    Exports MODEL, builds every candidate (each installed backend x fp32, fp16/bf16,
    int8 and int4), checks each against PyTorch on two held-out sets (from the
    calibration source, and made differently: --second-data), times each
    beside PyTorch eager, and writes the fastest that keeps the budget to OUTPUT
    with a report of every candidate's fate. MODEL is anything `export` takes.

    A diffusion pipeline (tiny-sd15, sd15 --random-weights, a diffusers folder, ...)
    is judged by image PSNR against diffusers on held-out prompts and seeds
    (--min-psnr, --size, --steps, --prompts, --seeds) and picked by its time per
    denoising step.
    """
    from enginekit.stages import OptimizeOptions
    from enginekit.stages import optimize as run_optimize

    fields = given_params(ctx, exclude=("model", "out", "as_json", "prompts_file", "seeds", "backends", "precisions",
                                        "caches", "token_merge"))
    caches = ctx.params.get("caches")
    if caches is not None:
        from enginekit.runtimes.tasks.step_cache import split_caches

        fields["caches"] = tuple(c for c in split_caches(caches) if c.lower() != "none")
    if prompts_file is not None:
        fields["prompts"] = prompts_file  # read by the pipeline's optimize, after the task is known
    for name, flag in (("seeds", "--seeds"), ("token_merge", "--token-merge")):
        text = seeds if name == "seeds" else ctx.params.get(name)
        if text is not None:
            fields[name] = _integers(text, flag)
    if backends is not None:
        fields["backends"] = csv(backends)
    if precisions is not None:
        fields["precisions"] = csv(precisions) or ()
    console = err_console()
    # Progress (ours and the quantizers' own bars) goes to stderr: stdout is the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        report = run_optimize(model, out, OptimizeOptions(**fields), on_step=render.step_printer(console))
    if as_json:
        emit_json(report)
        return
    render.stdout_console().print(render.optimize_report_table(report))
    for line in render.fate_lines(report):
        console.print(line, highlight=False)
    console.print(f"[green]wrote[/] {escape(str(out))} ({escape(str(report['picked']))}) and "
                  f"{escape(str(out / 'report.md'))}")
    rebuild = render.rebuild_lines(report)
    if rebuild:
        console.print(rebuild, highlight=False, markup=False, soft_wrap=True)


def _integers(text: str, flag: str) -> tuple[int, ...]:
    """A comma-separated list of integers (``--seeds 0,1``), or a usage error naming the flag."""
    try:
        return tuple(int(v) for v in csv(text) or ())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=flag) from None
