"""The exception tree of enginekit.

Every error a user can cause or meet is one of these, with a message that names
the problem and, where there is one, the fix. Library exceptions are caught at
the boundary and re-raised as one of these (``raise ... from exc``), so the CLI
can print one line instead of a traceback::

    EngineKitError
    ├── ArtifactError            an artifact folder cannot be used
    │   ├── ManifestError        missing, unreadable or invalid manifest.json
    │   │   └── UnknownTaskError the manifest's task has no registered task object
    │   └── IntegrityError       a file is missing, truncated or tampered with
    ├── BackendError             a backend cannot do what was asked
    │   ├── UnknownBackendError  no backend is registered under that name
    │   ├── BackendUnavailableError  registered, but its library is not installed
    │   ├── DeviceError          the device asked for is missing or unsupported
    │   ├── EngineBrokenError    a loaded engine failed and could not be put back
    │   └── RunInterrupted       a run stopped on purpose (Runner.interrupt)
    ├── InputError               bad user input to a task or runner
    │   ├── OptionError          an option that does not apply to this input (CLI: a usage error)
    │   ├── UnsupportedStageError  the artifact's task has no implementation of the stage
    │   ├── ImageError           a file or object that is not a readable image
    │   └── ShapeError           a feed with the wrong name, dtype or shape
    ├── MissingPackageError      an optional package a feature needs is not installed (also an ImportError)
    ├── SourceError              a model source (hub id, folder, file) cannot be loaded
    ├── QuantizationError        a quantization method cannot run as asked
    └── ExportError              export failed
        └── FidelityError        an engine drifted past its fidelity budget
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EngineKitError",
    "ArtifactError",
    "ManifestError",
    "UnknownTaskError",
    "IntegrityError",
    "BackendError",
    "UnknownBackendError",
    "BackendUnavailableError",
    "MissingPackageError",
    "need",
    "DeviceError",
    "EngineBrokenError",
    "RunInterrupted",
    "InputError",
    "OptionError",
    "UnsupportedStageError",
    "ImageError",
    "ShapeError",
    "SourceError",
    "QuantizationError",
    "ExportError",
    "FidelityError",
    "one_line",
]

#: Lines some libraries open their messages with that say where, not what (OpenVINO's C++ source location).
_LOCATION_LINES = ("Exception from ", "Check '")


def one_line(exc: BaseException, *, with_type: bool = False, limit: int = 300) -> str:
    """The one informative line of ``exc``'s message, for an error that wraps it
    (``raise ExportError(f"...: {one_line(exc)}") from exc``): the first non-empty line
    that is not a source location, else the exception's type name; ``with_type`` puts
    the type in front; longer than ``limit`` characters, it is cut with "..."."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # Asynchronous runs wrap a plugin's exception: "Caught exception: Exception from ...".
    lines = [ln.removeprefix("Caught exception:").strip() for ln in lines]
    useful = [ln for ln in lines if ln and not ln.startswith(_LOCATION_LINES)]
    text = (useful or lines or [""])[0]
    if with_type:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EngineKitError(Exception):
    """Base class of every error enginekit raises on purpose."""


class ArtifactError(EngineKitError):
    """An artifact folder cannot be used."""


class ManifestError(ArtifactError):
    """manifest.json is missing, unreadable or does not describe a valid artifact."""


class UnknownTaskError(ManifestError):
    """The manifest names a task no registered task object handles."""


class IntegrityError(ArtifactError):
    """A payload file is missing, or its sha256 differs from the manifest."""


class BackendError(EngineKitError):
    """A backend cannot do what was asked."""


class UnknownBackendError(BackendError):
    """No backend is registered under the requested name."""


class BackendUnavailableError(BackendError):
    """The backend is known but its library is not importable."""


class MissingPackageError(EngineKitError, ImportError):
    """An optional package a feature needs is not installed (the message names the pip extra)."""


def need(module: str, purpose: str, extra: str) -> Any:
    """``import module``, or a :class:`MissingPackageError` saying that ``purpose`` needs it and
    what to install: the edge install leaves out what only some features use."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingPackageError(f"{purpose} needs the {top} package, which is not installed: "
                                  f"pip install 'enginekit[{extra}]' ({one_line(exc)})") from exc


class DeviceError(BackendError):
    """The requested device is not present or not supported by the backend."""


class EngineBrokenError(BackendError):
    """A loaded engine failed and could not be put back: every later call is refused."""


class RunInterrupted(BackendError):
    """A run was stopped on purpose from another thread (``Runner.interrupt``)."""


class InputError(EngineKitError, ValueError):
    """Bad input handed to a task or a runner."""


class OptionError(InputError):
    """An option was set that does not apply to this input (a pipeline flag for a classifier)."""


class UnsupportedStageError(InputError):
    """The artifact's task has no implementation of the stage asked for."""


class ImageError(InputError):
    """Something that was meant to be an image could not be read as one."""


class ShapeError(InputError):
    """A feed has the wrong name, dtype or shape for the engine."""


class SourceError(EngineKitError):
    """A model source cannot be resolved or loaded."""


class QuantizationError(EngineKitError):
    """A quantization method cannot run as asked (bad option, unsupported model, quantizer failure)."""


class ExportError(EngineKitError):
    """Exporting a model failed."""


class FidelityError(ExportError):
    """An engine's outputs differ from its reference by more than the budget allows."""
