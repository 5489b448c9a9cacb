"""What ``enginekit doctor`` reports about this machine, as data (tables: :mod:`enginekit.app.render`)."""

from __future__ import annotations

from typing import Any

__all__ = ["doctor_report"]


def doctor_report() -> dict[str, Any]:
    """What `doctor` shows, as data: hardware fingerprint and every registered backend."""
    from enginekit.hardware import fingerprint
    from enginekit.registry import backend_class, backend_names

    backends = []
    for name in backend_names():
        entry: dict[str, Any] = {"name": name}
        try:
            cls = backend_class(name)
            entry["installed"] = cls.is_available()
            entry["version"] = cls.version()
            entry["extra"] = cls.extra
            entry["devices"] = cls().devices() if entry["installed"] else []
        except Exception as exc:  # a broken third-party backend must not break doctor
            entry.update(installed=False, error=f"{type(exc).__name__}: {exc}")
        backends.append(entry)
    return {"hardware": fingerprint(), "backends": backends}
