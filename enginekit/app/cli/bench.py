"""``enginekit bench``: time artifacts here (``bench run``) and report across machines (``bench report``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from enginekit.app import render
from enginekit.app.cli.common import DEVICE_HELP, Params, batches, cli, err_console, given_params


class _BenchGroup(click.Group):
    """`enginekit bench A B ...` runs the benchmark; `enginekit bench report ...` writes a report."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_BenchGroup)
def bench() -> None:
    """Benchmark artifacts on this machine, and report across machines.

    \b
      enginekit bench ART... [--batch 1,8] [--store results/results.jsonl] [--json out.json]
          [--baseline torch] [--mode latency|throughput] [--nireq N] [--threads N] [--ray HEAD:6379]
          [--height H --width W --steps N]     (pipelines)
      enginekit bench report results/ -o report/

    `bench ART...` is `bench run ART...`: every option is in `enginekit bench run --help`.
    """


@bench.command(name="run")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch", default=None, help="Batch sizes, comma separated [default: 1].")
@click.option("--runs", type=int, default=None,
              help="Timed runs per batch size (default 50); a pipeline's per component and step (default 5).")
@click.option("--duration", type=float, default=None, help="Or: seconds of timed runs per batch size.")
@click.option("--warmup", type=int, default=None, help="Untimed runs first (default 10; pipelines 1).")
@click.option("--threads", default=0, show_default=True, help="Engine threads (0: backend default); recorded.")
@click.option("-d", "--device", default="cpu", show_default=True, help=DEVICE_HELP + ".")
@click.option("--store", type=click.Path(path_type=Path), default=Path("results/results.jsonl"), show_default=True,
              help="JSON-lines results store the records are appended to.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write this run's records here.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Run on every node of the Ray cluster whose head is at HOST:PORT (needs enginekit[ray]).")
@click.option("--baseline", type=click.Choice(["torch"]), default=None,
              help="Also time PyTorch eager fp32 of each artifact's source model in the same run; "
                   "speed-ups are against it.")
@click.option("--mode", type=click.Choice(["latency", "throughput"]), default="latency", show_default=True,
              help="latency: one request at a time; throughput: several in flight (OpenVINO's async infer "
                   "queue, ONNX Runtime sessions run from threads), frames/s as benchmark_app reports.")
@click.option("--requests", "--nireq", "requests", default=0, show_default=True,
              help="Throughput mode: requests in flight (0: OpenVINO's optimal number, else one per core).")
@click.option("--same-process", is_flag=True,
              help="Time every engine in this process (faster; peak memory is then not reported).")
@click.option("--height", type=int, default=None, help="Pipelines: image height (default: the engine's).")
@click.option("--width", type=int, default=None, help="Pipelines: image width (default: the engine's).")
@click.option("--steps", default=20, show_default=True, help="Pipelines: denoising steps of the whole image.")
@click.option("--image-runs", default=1, show_default=True, help="Pipelines: timed whole images (0: none).")
def bench_run(**params: Any) -> None:
    """Time each ARTIFACT: warm latency p50/p90/p99, throughput, load and first
    inference, peak memory, size, and its recorded fidelity, in one row.

    A text-to-image ARTIFACT is timed per component, per denoising step and per
    whole image (--height/--width/--steps); with --baseline torch, diffusers' PyTorch
    pipeline of the same weights runs the same parts before and after the engine.

    A classifier ARTIFACT is timed in a fresh process of its own (its peak memory
    is its own); with --baseline torch, PyTorch eager runs before and after the
    engines, speed-ups divide by the faster, and a warning says when the
    machine's speed moved between the two. The load average and each engine's
    p99/p50 spread are recorded.

    With --ray, each node of the cluster benches copies of the ARTIFACTs (sent
    from here) and the records of every node are appended here."""
    from enginekit.bench.pipeline import baseline_note
    from enginekit.bench.session import run_notes
    from enginekit.bench.store import ResultsStore
    from enginekit.stages import BenchOptions
    from enginekit.stages import bench as run_bench

    o = Params(params)
    fields = given_params(click.get_current_context(), exclude=("artifacts", "batch", "store", "json_out"))
    if o.batch is not None:
        fields["batch_sizes"] = batches(o.batch)
    records = run_bench(o.artifacts, BenchOptions(**fields))
    ResultsStore(o.store).append(records)
    if o.json_out:
        o.json_out.write_text(json.dumps(records, indent=2, default=str))
    out = render.stdout_console()
    out.print(render.bench_table(records, o.store))
    note = baseline_note(records)
    if note:
        out.print(escape(note), highlight=False)
    for line in run_notes(records):
        out.print(escape(line), style="bold yellow" if line.startswith("WARNING") else None, highlight=False)
    if o.ray_address:
        # Records are saved and printed: leave without Ray's driver teardown, which can crash
        # the process after the work is done (a known Ray core-worker shutdown race).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@bench.command(name="report")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--no-plots", is_flag=True, help="Tables only: no PNG plots, and matplotlib is not needed.")
def bench_report(results: tuple[Path, ...], out: Path, no_plots: bool) -> None:
    """Markdown tables and PNG plots from RESULTS (.jsonl files or folders of them),
    per hardware and across hardware."""
    from enginekit.bench.report import write_report
    from enginekit.bench.store import read_results

    files = write_report(read_results(list(results)), out, plots=not no_plots)
    plots = f" and {len(files) - 1} plots" if not no_plots else " (tables only)"
    err_console().print(f"[green]wrote[/] {escape(str(out / 'report.md'))}{plots}")
