"""Backends and tasks registered by name and imported lazily.

Built-in backends are declared as entry points of the ``enginekit.backends``
group in pyproject.toml, the same mechanism a third-party package uses, so the
extension path is exercised by every run. :func:`register_backend` adds one at
run time (tests, notebooks). Nothing is imported until a backend is asked for.

Tasks work the same way under ``enginekit.tasks``: the manifest's ``task``
(``image-classification``, ``text-to-image``) names the class ``load()``
returns, so a new task is one module and one entry point.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

from enginekit.errors import BackendUnavailableError, UnknownBackendError, UnknownTaskError

if TYPE_CHECKING:
    from enginekit.engine import Backend

__all__ = [
    "ENTRY_POINT_GROUP",
    "TASK_ENTRY_POINT_GROUP",
    "register_backend",
    "backend_names",
    "get_backend",
    "backend_class",
    "register_task",
    "task_names",
    "task_class",
]

ENTRY_POINT_GROUP = "enginekit.backends"
TASK_ENTRY_POINT_GROUP = "enginekit.tasks"

_runtime: dict[str, str] = {}
_runtime_tasks: dict[str, str] = {}


def register_backend(name: str, target: str) -> None:
    """Register ``target`` (``"package.module:Class"``) as backend ``name``.

    Registering a name twice is an error, not a warning: two backends
    answering to one name would make results depend on import order.
    """
    if name in _entry_points() or name in _runtime:
        raise ValueError(f"a backend named {name!r} is already registered")
    _runtime[name] = target


def _entry_points(group: str = ENTRY_POINT_GROUP) -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=group)}


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


def get_backend(name: str) -> Backend:
    """Return an instance of backend ``name``, or a one-line error naming the extra to install."""
    cls = backend_class(name)
    if not cls.is_available():
        raise BackendUnavailableError(
            f"backend {name!r} is not installed; install it with: pip install 'enginekit[{cls.extra}]'"
        )
    return cls()


def register_task(name: str, target: str) -> None:
    """Register ``target`` (``"package.module:Class"``) as the task object for manifests of task ``name``."""
    if name in _entry_points(TASK_ENTRY_POINT_GROUP) or name in _runtime_tasks:
        raise ValueError(f"a task named {name!r} is already registered")
    _runtime_tasks[name] = target


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
