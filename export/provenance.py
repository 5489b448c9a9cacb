"""What every export records about how it was made: tool versions and the host."""

from __future__ import annotations

import contextlib
from importlib import metadata
from typing import Any, Sequence

__all__ = ["tool_versions", "host"]

_COMMON = ("enginekit", "torch", "onnx", "onnxruntime", "onnxscript")


def tool_versions(opset: int, libraries: Sequence[str] = ()) -> dict[str, Any]:
    """The opset and the installed versions of the exporting tools plus ``libraries``."""
    versions: dict[str, Any] = {"opset": opset}
    for pkg in (*_COMMON, *libraries):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return versions


def host() -> dict[str, Any]:
    """The building machine's hardware fingerprint."""
    from enginekit.hardware import fingerprint

    return fingerprint()
