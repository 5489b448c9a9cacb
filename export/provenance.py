"""What every export records about how it was made: tool versions and the host."""

from __future__ import annotations

import contextlib
import math
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from enginekit.errors import ExportError, InputError

__all__ = ["tool_versions", "host", "graph_opset", "check_export_request", "OPSETS"]

#: The opsets the exporter writes as asked: torch's ONNX functions are written for 18, and
#: a lower opset is a version conversion that may fail and silently keep 18.
OPSETS = range(18, 24)

_COMMON = ("enginekit", "torch", "onnx", "onnxruntime", "onnxscript")


def check_export_request(opset: Any, atol: Any = 0.0, rtol: Any = 0.0) -> None:
    """Refuse, before anything runs, an opset the exporter does not write and a parity
    budget that is not a finite number >= 0 (NaN would turn the gate off)."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise InputError(f"--opset {opset!r} is not supported; the exporter writes opsets "
                         f"{OPSETS.start} to {OPSETS.stop - 1}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InputError(f"--{name} {value!r} is not a tolerance; give a finite number >= 0")


def graph_opset(path: str | Path) -> int:
    """The default-domain (ai.onnx) opset the ONNX graph at ``path`` imports."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not found:
        raise ExportError(f"{path}: the exported graph imports no ai.onnx opset")
    return int(found[0])


def tool_versions(opset: int, libraries: Sequence[str] = (), graphs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The opset and the installed versions of the exporting tools plus ``libraries``.
    ``graphs``: the exported ONNX files; the opset recorded is what they hold (the
    highest), not what was asked."""
    if graphs:
        opset = max(graph_opset(g) for g in graphs)
    versions: dict[str, Any] = {"opset": opset}
    for pkg in (*_COMMON, *libraries):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return versions


def host() -> dict[str, Any]:
    """The building machine's hardware fingerprint."""
    from enginekit.hardware import fingerprint

    return fingerprint()
