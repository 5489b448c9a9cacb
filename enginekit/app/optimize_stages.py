"""``enginekit.stages.optimize`` for each task: the options object in, the task's own
``optimize`` (:mod:`enginekit.app.optimize`, :mod:`enginekit.app.optimize_pipeline`) out.

Each adapter refuses, in one line, the options of the other task, and leaves what
was not set to the implementation's own defaults (its config dataclass).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from enginekit.errors import OptionError, one_line
from enginekit.stages import OptimizeOptions, refuse

__all__ = ["optimize_classifier", "optimize_text_to_image"]

_COMMON = ("backends", "precisions", "threads", "random_weights", "revision", "seed", "work", "overwrite")
_CLASSIFIER = ("budget_agreement", "budget_cosine", "tie_margin", "batch", "data", "second_data",
               "calibration_size", "eval_size", "runs", "duration", "warmup", "dynamic_shape", "weights", "store",
               "token_merge")
_PIPELINE = ("min_psnr", "size", "steps", "prompts", "seeds", "without_t5", "streaming", "caches", "duration")
# OptimizeOptions' name -> the config field it sets, where the two differ.
_RENAMED = {"budget_agreement": "min_agreement", "budget_cosine": "min_cosine", "duration": "duration_s"}


def _config(cls: type, options: OptimizeOptions, names: tuple[str, ...]) -> Any:
    return cls(**{_RENAMED.get(k, k): v for k, v in options.set(("backends", "precisions", "threads", *names)).items()})


def optimize_classifier(model: str, out: str | Path, options: OptimizeOptions, *,
                        on_step: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Pick a classifier engine: :func:`enginekit.app.optimize.optimize`."""
    from enginekit.app.optimize import OptimizeConfig, optimize

    refuse(options, _COMMON + _CLASSIFIER, lambda wrong: f"{wrong[0]} is for diffusion pipelines; {model!r} is an "
                                                          "image classifier")
    config = _config(OptimizeConfig, options, tuple(n for n in _CLASSIFIER if n not in ("dynamic_shape", "weights", "store")))
    if options.dynamic_shape:
        config = replace(config, static_shape=False)
    if options.duration is not None and options.runs is None:
        config = replace(config, runs=None)  # timed for a duration, not a count
    try:
        config.bench_config()
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    report = optimize(model, out, config, work_dir=options.work, on_step=on_step,
                      **options.set(("random_weights", "weights", "revision", "seed", "overwrite")))
    if options.store is not None:
        from enginekit.bench.store import ResultsStore

        ResultsStore(options.store).append([report["baseline"]] + [c["record"] for c in report["candidates"]
                                                                    if c["record"]])
    return report


def _read_prompts(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"--prompts: cannot read {path}: {one_line(exc)}") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def optimize_text_to_image(model: str, out: str | Path, options: OptimizeOptions, *,
                           on_step: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Pick a pipeline assembly: :func:`enginekit.app.optimize_pipeline.optimize_pipeline`."""
    from enginekit.app.optimize_pipeline import PipelineOptimizeConfig, optimize_pipeline

    refuse(options, _COMMON + _PIPELINE,
           lambda wrong: f"{wrong[0]} is for classifiers; {model!r} is a diffusion pipeline (its flags: --min-psnr, "
                         "--size, --steps, --prompts, --seeds, --no-t5, --streaming, --caches, --backends, --precisions, "
                         "--duration)")
    if isinstance(options.prompts, (str, Path)):
        options = replace(options, prompts=_read_prompts(Path(options.prompts)))
    config = _config(PipelineOptimizeConfig, options, tuple(n for n in _PIPELINE if n != "duration"))
    if options.duration is not None:  # a pipeline's timing budget per side, not a classifier's run length
        try:
            config = replace(config, timing=replace(config.timing, budget_s=options.duration))
        except ValueError:
            raise OptionError(f"--duration must be at least 0 seconds, got {options.duration}") from None
    return optimize_pipeline(model, out, config, work_dir=options.work, on_step=on_step,
                             **options.set(("random_weights", "revision", "seed", "overwrite")))
