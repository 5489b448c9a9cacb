"""The stages as library calls, each routed once through the task registry.

``quantize``, ``evaluate``, ``optimize`` and ``bench`` read which
task their input is (the manifest's ``task``, or what a model source exports
to) and call that task's implementation, named in
:func:`enginekit.registry.task_stages`. Nothing here knows a task by name,
and nothing here imports a stage: the implementations are imported on use.

Each stage takes one typed options object. Every field is ``None`` until
set, and an implementation applies its own defaults to what is unset (one
default per value, in the implementation) and refuses, in one line, a set
field that does not apply to its task: :func:`refuse`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from enginekit.errors import OptionError, UnknownTaskError, UnsupportedStageError
from enginekit.registry import stage

T = TypeVar("T")

__all__ = [
    "with_fields",
    "QuantizeOptions",
    "OptimizeOptions",
    "BenchOptions",
    "quantize",
    "evaluate",
    "optimize",
    "bench",
    "details",
    "given",
    "refuse",
]


def _flag(name: str) -> Any:
    """A field's command-line spelling, for messages that name what was set."""
    return field(default=None, metadata={"flag": name})


class _Options:
    """What the options objects share: which fields were set, and how each is spelt as a flag."""

    def given(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    @classmethod
    def flag(cls, name: str) -> str:
        meta = {f.name: f.metadata for f in fields(cls)}.get(name, {})  # type: ignore[arg-type]
        return meta.get("flag") or "--" + name.replace("_", "-")

    def set(self, names: Iterable[str]) -> dict[str, Any]:
        """The set fields among ``names``, as keyword arguments."""
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def with_fields(cls: type[T], options: T | None, named: Mapping[str, Any]) -> T:
    """``options`` (``cls()`` when None) with the fields a caller gave by name (``named``, the
    keyword arguments of a function that takes a typed options object) replaced; a name that is
    no field of ``cls`` is a one-line :class:`OptionError` listing the ones it has."""
    if options is not None and not isinstance(options, cls):
        raise OptionError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(named) - known)
    if unknown:
        raise OptionError(f"{cls.__name__} has no field {unknown[0]!r} (it takes: {', '.join(sorted(known))})")
    return replace(options if options is not None else cls(), **named)


def given(options: Any) -> list[str]:
    """Names of the fields of ``options`` that were set."""
    return options.given()


def refuse(options: Any, allowed: Iterable[str], message: Callable[[list[str]], str]) -> None:
    """Raise :class:`OptionError` when ``options`` sets a field outside ``allowed``;
    ``message`` gets the flags of the fields that do not apply, in field order."""
    wrong = [options.flag(n) for n in options.given() if n not in set(allowed)]
    if wrong:
        raise OptionError(message(wrong))


@dataclass(frozen=True)
class QuantizeOptions(_Options):
    """What ``quantize`` was asked; each task's implementation takes its own fields."""

    method: str | None = None
    #: The backend's (classifiers) or the pipeline's default int8 method.
    int8: bool | None = None
    fp16: bool | None = None
    backend: str | None = None
    target: str | None = None
    calibration: str | None = None
    overwrite: bool | None = None
    # classifiers
    eval_data: str | None = None
    calibrate_method: str | None = None
    per_channel: bool | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    ratio: float | None = None
    exclude: tuple[str, ...] | None = None
    min_agreement: float | None = None
    min_cosine: float | None = None
    auto_fallback: bool | None = None
    allow_synthetic_calibration: bool | None = None
    calibration_size: int | None = None
    eval_size: int | None = None
    # data-aware weight compression (NNCF, OpenVINO int4), optimum-intel's names; ``dataset`` is
    # ``calibration`` under optimum's name (give one)
    dataset: str | None = None
    awq: bool | None = None
    scale_estimation: bool | None = None
    # pipelines
    components: Mapping[str, str] | None = _flag("--component")
    calibration_prompts: int | None = None
    calibration_steps: int | None = None
    min_psnr: float | None = None
    min_ssim: float | None = None


@dataclass(frozen=True)
class OptimizeOptions(_Options):
    """What ``optimize`` was asked; each task's implementation takes its own fields."""

    backends: tuple[str, ...] | None = None
    precisions: tuple[str, ...] | None = None
    threads: int | None = None
    random_weights: bool | None = None
    revision: str | None = None
    seed: int | None = None
    work: Path | None = None
    overwrite: bool | None = None
    # classifiers
    budget_agreement: float | None = None
    budget_cosine: float | None = None
    tie_margin: float | None = None
    batch: int | None = None
    data: str | None = None
    second_data: str | None = None
    calibration_size: int | None = None
    eval_size: int | None = None
    runs: int | None = None
    duration: float | None = None
    warmup: int | None = None
    dynamic_shape: bool | None = None
    weights: Path | None = None
    #: Also append the timing records to this results store.
    store: Path | None = None
    #: ViTs: token pairs per block to try merging (ToMe) on each candidate that passes unmerged.
    token_merge: tuple[int, ...] | None = _flag("--token-merge")
    # pipelines
    min_psnr: float | None = None
    size: int | None = None
    steps: int | None = None
    #: Held-out prompts, or a file of them, one a line.
    prompts: tuple[str, ...] | Path | None = _flag("--prompts")
    seeds: tuple[int, ...] | None = None
    without_t5: bool | None = _flag("--no-t5")
    #: Pipelines: export streamed (one block's weights in memory at a time).
    streaming: bool | None = _flag("--streaming")
    #: Step caches tried on the fastest pipeline within the budget ("deepcache:2", "taylorseer:3", ...;
    #: () for none; None: the denoiser's own).
    caches: tuple[str, ...] | None = _flag("--caches")


@dataclass(frozen=True)
class BenchOptions(_Options):
    """What ``bench`` was asked; each task's implementation takes its own fields."""

    batch_sizes: tuple[int, ...] | None = _flag("--batch")
    runs: int | None = None
    duration: float | None = None
    warmup: int | None = None
    threads: int | None = None
    device: str | None = None
    baseline: str | None = None
    # classifiers
    mode: str | None = None
    requests: int | None = None
    same_process: bool | None = None
    ray_address: str | None = _flag("--ray")
    # pipelines
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    image_runs: int | None = None


def _task_of(artifact: str | Path) -> str:
    from enginekit.manifest import read_manifest

    return read_manifest(artifact).task


def quantize(artifact: str | Path, out: str | Path, options: QuantizeOptions = QuantizeOptions(), *,
             on_step: Callable[[str], None] = lambda msg: None) -> Any:
    """Quantize ``artifact`` into ``out`` with its task's implementation (a classifier's
    ONNX Runtime / OpenVINO methods, gated on logits; a pipeline's per-component plan,
    gated on the image). Returns the new manifest."""
    from enginekit.manifest import read_manifest

    manifest = read_manifest(artifact)
    adapted = [n for n, c in manifest.components.items() if c.interface]
    if adapted:  # the quantizers feed and rewrite engines by enginekit's tensor names
        raise UnsupportedStageError(f"quantize takes engines under enginekit's tensor names; {artifact} was imported "
                                    f"and {', '.join(adapted)} keep{'s' if len(adapted) == 1 else ''} optimum's: "
                                    "quantize with optimum-cli (--weight-format), or export the model with enginekit")
    return stage(manifest.task, "quantize")(artifact, out, options, on_step=on_step)


def evaluate(artifact: str | Path, data: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """Accuracy and agreement with the float parent, where the artifact's task has such a measure."""
    return stage(_task_of(artifact), "evaluate")(artifact, data, limit=limit)


def optimize(model: str, out: str | Path, options: OptimizeOptions = OptimizeOptions(), *,
             on_step: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Find the fastest engine for ``model`` (anything ``export`` takes) that keeps its
    fidelity, with the implementation of the task the source exports to. Returns the report."""
    from enginekit.registry import source_task

    return stage(source_task(model), "optimize")(model, out, options, on_step=on_step)


def bench(artifacts: Sequence[str | Path], options: BenchOptions = BenchOptions()) -> list[dict[str, Any]]:
    """Time ``artifacts``: each task's implementation benches its own artifacts (grouped by
    task, in the order given) and returns records with speed-ups; every group is checked
    (``check_only=True``) before any is timed."""
    groups: dict[str, list[Path]] = {}
    for path in artifacts:
        groups.setdefault(_task_of(path), []).append(Path(path))
    benches = {task: stage(task, "bench") for task in groups}
    for task, paths in groups.items():  # refuse what cannot run before minutes of timing
        benches[task](paths, options, check_only=True)
    records: list[dict[str, Any]] = []
    for task, paths in groups.items():
        records += benches[task](paths, options)
    return records


def details(manifest: Any) -> list[tuple[str, str]]:
    """(label, value) rows of what ``inspect`` shows beyond the common fields, by task."""
    try:
        return stage(manifest.task, "details")(manifest)
    except (UnsupportedStageError, UnknownTaskError):  # inspect shows what it can of any artifact
        return []
