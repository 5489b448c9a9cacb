"""Backends registered by name and imported lazily.

Built-in backends are declared as entry points of the ``enginekit.backends``
group in pyproject.toml, the same mechanism a third-party package uses, so the
extension path is exercised by every run. :func:`register_backend` adds one at
run time (tests, notebooks). Nothing is imported until a backend is asked for.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING

from enginekit.errors import BackendUnavailableError, UnknownBackendError

if TYPE_CHECKING:
    from enginekit.runtimes.base import Backend

__all__ = ["ENTRY_POINT_GROUP", "register_backend", "backend_names", "get_backend", "backend_class"]

ENTRY_POINT_GROUP = "enginekit.backends"

_runtime: dict[str, str] = {}


def register_backend(name: str, target: str) -> None:
    """Register ``target`` (``"package.module:Class"``) as backend ``name``.

    Registering a name twice is an error, not a warning: two backends
    answering to one name would make results depend on import order.
    """
    if name in _entry_points() or name in _runtime:
        raise ValueError(f"a backend named {name!r} is already registered")
    _runtime[name] = target


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


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
    module_name, _, attr = targets[name].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


def get_backend(name: str) -> Backend:
    """Return an instance of backend ``name``, or a one-line error naming the extra to install."""
    cls = backend_class(name)
    if not cls.is_available():
        raise BackendUnavailableError(
            f"backend {name!r} is not installed; install it with: pip install 'enginekit[{cls.extra}]'"
        )
    return cls()
