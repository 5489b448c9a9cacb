"""``enginekit.stages.bench`` for each task: the options object in, records out.

One ``bench`` run may mix tasks, so an option of one task is not an error for the
other's artifacts: each adapter reads the fields it takes, refuses in one line the
combinations it cannot time, and leaves what was not set to its config's defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from enginekit.errors import OptionError
from enginekit.stages import BenchOptions

__all__ = ["bench_classifiers", "bench_pipelines"]

def _config(cls: type, options: BenchOptions, **extra: Any) -> Any:
    """``cls`` (BenchConfig or PipelineBenchConfig) from the set options; a bad value is one line."""
    fields = options.set(("warmup", "runs", "threads"))
    if options.duration is not None:
        fields.update(duration_s=options.duration, runs=options.runs)  # a duration replaces the default count
    try:
        return cls(**fields, **extra)
    except ValueError as exc:
        raise OptionError(str(exc)) from None


def bench_classifiers(paths: Sequence[Path], options: BenchOptions, *, check_only: bool = False) -> list[dict[str, Any]]:
    """Classifiers: each in its own process (or on every node of a Ray cluster), speed-ups filled.
    ``check_only``: refuse what cannot run, and time nothing."""
    from enginekit.bench.harness import BenchConfig, add_speedups
    from enginekit.bench.session import bench_classifiers as run

    if (options.requests or 0) < 0:
        raise OptionError(f"--requests must be at least 0, got {options.requests}")
    if options.mode == "throughput" and options.ray_address:
        raise OptionError("--mode throughput times classifier artifacts on this machine: drop --ray")
    config = _config(BenchConfig, options, **({"batch_sizes": options.batch_sizes} if options.batch_sizes else {}))
    device = options.device or "cpu"
    baseline = options.baseline == "torch"
    if check_only:
        return []
    if options.ray_address:
        from enginekit.bench.cluster import bench_on_ray

        records = bench_on_ray(options.ray_address, paths, config, device=device, torch_baseline=baseline,
                               shutdown=False)
    else:
        records = run(paths, config, device, baseline=baseline, mode=options.mode or "latency",
                      requests=options.requests or 0, isolate=not options.same_process)
    add_speedups(records)
    return records


def bench_pipelines(paths: Sequence[Path], options: BenchOptions, *, check_only: bool = False) -> list[dict[str, Any]]:
    """Text-to-image pipelines: per component, per step and per whole image, at one batch.
    ``check_only``: refuse what cannot run, and time nothing."""
    from enginekit.bench.harness import add_speedups
    from enginekit.bench.pipeline import PipelineBenchConfig, bench_pipeline

    if options.mode == "throughput":
        raise OptionError("--mode throughput times classifier artifacts on this machine: "
                          "drop --ray and the pipelines")
    if options.ray_address or (options.batch_sizes and len(options.batch_sizes) > 1):
        raise OptionError("a text-to-image pipeline is benched here at one batch (--batch N images): "
                          "drop --ray or the extra batch sizes")
    images = {"images": options.batch_sizes[0]} if options.batch_sizes else {}
    config = _config(PipelineBenchConfig, options, **images, **options.set(("height", "width", "steps",
                                                                            "image_runs")))
    records: list[dict[str, Any]] = []
    if check_only:
        return records
    for path in paths:
        records += bench_pipeline(path, config, device=options.device or "cpu", baseline=options.baseline == "torch")
    add_speedups(records)
    return records
