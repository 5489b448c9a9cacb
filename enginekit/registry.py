"""Backends and tasks registered by name and imported lazily.

Built-in backends are declared as entry points of the ``enginekit.backends``
group in pyproject.toml, the same mechanism a third-party package uses, so the
extension path is exercised by every run. :func:`register_backend` adds one at
run time (tests, notebooks). Nothing is imported until a backend is asked for.

Tasks work the same way under ``enginekit.tasks``: the manifest's ``task``
(``image-classification``, ``text-to-image``) names the class ``load()``
returns, so a new task is one module and one entry point.

A task also names the implementations of the stages that differ by task
(:class:`TaskStages`: quantize, evaluate, optimize, bench, inspect's details),
as ``"module:attr"`` strings imported on use. :func:`stage` is the one place
a task name chooses code: the library's stage functions (``enginekit.stages``)
and the CLI ask it, and never compare a task name themselves.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, fields
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable

from enginekit.errors import BackendUnavailableError, UnknownBackendError, UnknownTaskError, UnsupportedStageError

if TYPE_CHECKING:
    from enginekit.engine import Backend

__all__ = [
    "ENTRY_POINT_GROUP",
    "TASK_ENTRY_POINT_GROUP",
    "register_backend",
    "backend_names",
    "get_backend",
    "backend_class",
    "backend_for_kind",
    "register_task",
    "task_names",
    "task_class",
    "TaskStages",
    "task_stages",
    "stage",
    "expect_stage",
    "source_task",
]

ENTRY_POINT_GROUP = "enginekit.backends"
TASK_ENTRY_POINT_GROUP = "enginekit.tasks"

_runtime: dict[str, str] = {}
_runtime_tasks: dict[str, str] = {}


@dataclass(frozen=True)
class TaskStages:
    """Where one task's stage implementations live (``"module:attr"``; None: the stage does
    not apply to the task). Each is called as :mod:`enginekit.stages` documents:

    - ``quantize(artifact, out, QuantizeOptions, on_step=)`` -> the new manifest
    - ``evaluate(artifact, data, limit=)`` -> a report dict
    - ``optimize(model, out, OptimizeOptions, on_step=)`` -> the report dict
    - ``bench(paths, BenchOptions, check_only=False)`` -> records (none when ``check_only``)
    - ``details(manifest)`` -> (label, value) rows ``inspect`` adds
    - ``export(source, out, ExportRequest, on_step=)`` -> the manifest (``enginekit.export.api``)
    - ``recognises(source, family)`` -> whether a model source (``export``'s MODEL) exports to this task
    - ``serve``: the :class:`enginekit.serve.served.Served` subclass ``enginekit serve`` fronts
      a loaded model of this task with
    - ``genai_layout(artifact, out, overwrite=, on_step=)`` -> the manifest: OpenVINO GenAI's
      folder layout of a compiled OpenVINO artifact (``compile --genai``)
    - ``import_folder(folder, scratch, on_step)`` -> an ``enginekit.export.importer.FolderPlan``
      for a folder another tool (optimum) wrote for this task, None when it is not one
      (``enginekit import``)
    """

    quantize: str | None = None
    evaluate: str | None = None
    optimize: str | None = None
    bench: str | None = None
    details: str | None = None
    export: str | None = None
    recognises: str | None = None
    serve: str | None = None
    genai_layout: str | None = None
    import_folder: str | None = None
    #: ``relink(source_root, source_manifest, out_root, compiled_manifest)`` -> the compiled manifest:
    #: run by ``compile`` before the manifest is written (text-to-image: the LoRA weight map's
    #: tensors found again in the compiled engines).
    relink: str | None = None


#: Where text-to-image's GenAI layout writer lives (its own check names it too).
GENAI_LAYOUT = "enginekit.runtimes.openvino_genai:write_genai_layout"
_BUILTIN_STAGES: dict[str, TaskStages] = {
    "image-classification": TaskStages(
        quantize="enginekit.quant.api:quantize_classifier",
        evaluate="enginekit.quant.api:evaluate_artifact",
        optimize="enginekit.app.optimize_stages:optimize_classifier",
        bench="enginekit.bench.stages:bench_classifiers",
        export="enginekit.export.api:export_classifier_source",
        serve="enginekit.serve.served:ServedClassifier",
        import_folder="enginekit.export.import_classifier:read_classifier_folder",
    ),
    "text-to-image": TaskStages(
        quantize="enginekit.quant.api:quantize_text_to_image",
        optimize="enginekit.app.optimize_stages:optimize_text_to_image",
        bench="enginekit.bench.stages:bench_pipelines",
        details="enginekit.app.render:pipeline_details",
        export="enginekit.export.api:export_pipeline_source",
        recognises="enginekit.export.api:is_pipeline_source",
        serve="enginekit.serve.served:ServedPipeline",
        genai_layout=GENAI_LAYOUT,
        import_folder="enginekit.export.import_pipeline:read_pipeline_folder",
        relink="enginekit.runtimes.lora_map:relink",
    ),
}
_runtime_stages: dict[str, TaskStages] = {}
#: The task a model source exports to when no task's ``recognises`` claims it.
DEFAULT_SOURCE_TASK = "image-classification"


def register_backend(name: str, target: str) -> None:
    """Register ``target`` (``"package.module:Class"``) as backend ``name``.

    Registering a name twice is an error, not a warning: two backends
    answering to one name would make results depend on import order.
    """
    if name in _entry_points() or name in _runtime:
        raise ValueError(f"a backend named {name!r} is already registered")
    _runtime[name] = target


def _entry_points(group: str = ENTRY_POINT_GROUP) -> dict[str, str]:
    return dict(_installed_entry_points(group))


@functools.lru_cache(maxsize=None)
def _installed_entry_points(group: str) -> tuple[tuple[str, str], ...]:
    """The installed entry points of ``group``, read once per process (scanning every
    installed distribution's metadata takes tens of milliseconds, on every artifact check)."""
    return tuple((ep.name, ep.value) for ep in metadata.entry_points(group=group))


def _import(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _targets() -> dict[str, str]:
    return {**_entry_points(), **_runtime}


def backend_names() -> list[str]:
    """Names of every registered backend, installed or not."""
    return sorted(_targets())


def backend_class(name: str) -> type[Backend]:
    """Import and return the class registered as ``name``."""
    targets = _targets()
    if name not in targets:
        known = ", ".join(sorted(targets)) or "none"
        raise UnknownBackendError(f"unknown backend {name!r}; known backends: {known}")
    return _import(targets[name])


def unregister_backend(name: str) -> None:
    """Forget a backend :func:`register_backend` added (tests, notebooks); entry points stay."""
    _runtime.pop(name, None)


def backend_for_kind(kind: str) -> type[Backend] | None:
    """The backend class whose :meth:`~enginekit.engine.Backend.compile` writes artifacts of
    ``kind`` (it answers what the core asks about their files); None for the exported ``onnx``
    kind, a kind no registered backend writes, or one whose backend does not import."""
    for _, target in sorted(_targets().items()):  # one scan of the entry points
        try:
            cls = _import(target)
        except (ImportError, AttributeError):
            continue
        if getattr(cls, "kind", None) == kind:
            return cls
    return None


def get_backend(name: str) -> Backend:
    """Return an instance of backend ``name``, or a one-line error naming the extra to install."""
    cls = backend_class(name)
    if not cls.is_available():
        reason = cls.unavailable_reason() if hasattr(cls, "unavailable_reason") else None
        if reason is None or reason.startswith("not installed"):
            raise BackendUnavailableError(
                f"backend {name!r} is not installed; install it with: pip install 'enginekit[{cls.extra}]'")
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
    return cls()


def register_task(name: str, target: str, stages: TaskStages | None = None) -> None:
    """Register ``target`` (``"package.module:Class"``) as the task object for manifests of task
    ``name``, with its stage implementations (``stages``; None: no stage but ``load``)."""
    if name in _entry_points(TASK_ENTRY_POINT_GROUP) or name in _runtime_tasks:
        raise ValueError(f"a task named {name!r} is already registered")
    _runtime_tasks[name] = target
    _runtime_stages[name] = stages or TaskStages()


def unregister_task(name: str) -> None:
    """Forget a task :func:`register_task` added (tests, notebooks); entry points stay."""
    _runtime_tasks.pop(name, None)
    _runtime_stages.pop(name, None)


def task_stages(name: str) -> TaskStages:
    """The stage implementations of task ``name`` (a one-line error for a task nobody registered)."""
    if name not in _task_targets():
        known = ", ".join(task_names()) or "none"
        raise UnknownTaskError(f"task {name!r} is not supported by this enginekit (it knows: {known})")
    return _runtime_stages.get(name) or _BUILTIN_STAGES.get(name) or TaskStages()


def stage(task: str, name: str) -> Callable[..., Any]:
    """Import and return task ``task``'s implementation of stage ``name`` (a field of
    :class:`TaskStages`); :class:`UnsupportedStageError` names the tasks it applies to."""
    target = getattr(task_stages(task), name)
    if target is None:
        takers = [t for t in task_names() if getattr(task_stages(t), name) is not None]
        raise UnsupportedStageError(f"{name} does not apply to {task} artifacts"
                                    + (f" (it takes: {', '.join(takers)})" if takers else ""))
    return _import(target)


def expect_stage(task: str, name: str, target: str) -> None:
    """Refuse, in one line, to run ``target`` as stage ``name`` for a ``task`` that routes
    the stage elsewhere (a direct call of one task's implementation with another's artifact)."""
    routed = getattr(task_stages(task), name)
    if routed != target:
        raise UnsupportedStageError(
            f"this is a {task} artifact: {target.replace(':', '.')} does not take it"
            + (f"; use enginekit.stages.{name} (for {task}: {routed.replace(':', '.')})" if routed else
               f"; {name} does not apply to {task} artifacts"))


def source_task(source: str, family: str | None = None) -> str:
    """The task model ``source`` (anything ``export`` takes; ``family``: a diffusion family it
    was given) exports to: the first task whose ``recognises`` claims it, else
    :data:`DEFAULT_SOURCE_TASK`."""
    for name in task_names():
        target = task_stages(name).recognises
        if target is not None and _import(target)(source, family):
            return name
    return DEFAULT_SOURCE_TASK


def stage_names() -> list[str]:
    """The stages a task may implement (the fields of :class:`TaskStages`)."""
    return [f.name for f in fields(TaskStages)]


def _task_targets() -> dict[str, str]:
    return {**_entry_points(TASK_ENTRY_POINT_GROUP), **_runtime_tasks}


def task_names() -> list[str]:
    """Names of every registered task."""
    return sorted(_task_targets())


def task_class(name: str) -> Any:
    """Import and return the task class for manifests whose ``task`` is ``name``.

    The class has ``from_artifact(components, manifest, path, **options)``.
    """
    targets = _task_targets()
    if name not in targets:
        known = ", ".join(sorted(targets)) or "none"
        raise UnknownTaskError(f"task {name!r} is not supported by this enginekit (it knows: {known})")
    return _import(targets[name])
