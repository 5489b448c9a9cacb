"""JSON files a model source carries (configs, model_index.json) and the configs written back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from enginekit.errors import SourceError, one_line

__all__ = ["read_json", "jsonable"]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line SourceError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: unreadable ({one_line(exc)})") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{path}: must hold a JSON object")
    return data


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays made plain JSON (configs hold both)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
