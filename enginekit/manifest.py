"""The engine card: ``manifest.json`` of an artifact folder.

Every stage reads an artifact and writes a new one; the manifest is the only
thing a later stage or ``load()`` needs to know about it. Parsing is strict:
an unknown schema version or a missing field is a :class:`ManifestError` that
says which field, never a ``KeyError`` from deep inside.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from enginekit.errors import ManifestError

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "ARTIFACT_KINDS",
    "TensorSpec",
    "FileEntry",
    "Component",
    "Manifest",
    "read_manifest",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: What an artifact folder can hold. ``onnx`` is an exported (or quantized)
#: ONNX graph that ONNX Runtime runs as is; the others are compiled engines.
ARTIFACT_KINDS = ("onnx", "onnxruntime", "openvino", "tensorrt")
TASKS = ("image-classification", "text-to-image")


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype name and shape of one input or output.

    Symbolic dimensions (a dynamic batch) are strings such as ``"batch"``.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=tuple(data["shape"]))


@dataclass(frozen=True)
class FileEntry:
    """A payload file, relative to the artifact folder, with its size and sha256."""

    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileEntry:
        return cls(path=str(data["path"]), sha256=str(data["sha256"]), size=int(data["size"]))


@dataclass(frozen=True)
class Component:
    """One engine of an artifact (the classifier, or a pipeline's UNet, VAE, ...).

    ``entry`` is the file a backend opens (``model.onnx``, ``model.xml``);
    ``files`` lists every file the component needs, the entry included.
    """

    name: str
    entry: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {
            "entry": self.entry,
            "files": [f.to_dict() for f in self.files],
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Component:
        return cls(
            name=name,
            entry=str(data["entry"]),
            files=tuple(FileEntry.from_dict(f) for f in data["files"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            precision=str(data.get("precision", "fp32")),
        )


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of an artifact folder.

    The free-form sections (``provenance``, ``target``, ``quantization``,
    ``fidelity``, ``preprocessing``) are plain JSON objects so that stages can
    add what they measure without a schema change; the keys each stage writes
    are documented in DESIGN.md.
    """

    kind: str
    task: str
    family: str
    components: Mapping[str, Component]
    preprocessing: Mapping[str, Any] | None = None
    labels: tuple[str, ...] | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    target: Mapping[str, Any] = field(default_factory=dict)
    quantization: Mapping[str, Any] | None = None
    fidelity: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def component(self, name: str | None = None) -> Component:
        """Return the named component, or the only one when ``name`` is None."""
        if name is None:
            if len(self.components) != 1:
                raise ManifestError(
                    f"artifact has {len(self.components)} components "
                    f"({', '.join(self.components)}); name one"
                )
            return next(iter(self.components.values()))
        try:
            return self.components[name]
        except KeyError:
            raise ManifestError(
                f"artifact has no component {name!r}; it has: {', '.join(self.components)}"
            ) from None

    def replace(self, **changes: Any) -> Manifest:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "task": self.task,
            "family": self.family,
            "components": {n: c.to_dict() for n, c in self.components.items()},
            "preprocessing": dict(self.preprocessing) if self.preprocessing is not None else None,
            "labels": list(self.labels) if self.labels is not None else None,
            "provenance": dict(self.provenance),
            "target": dict(self.target),
            "quantization": dict(self.quantization) if self.quantization is not None else None,
            "fidelity": dict(self.fidelity),
            "extra": dict(self.extra),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def digest(self) -> str:
        """sha256 of the canonical JSON form; children record it as their parent's hash."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        if not isinstance(data, Mapping):
            raise ManifestError("manifest.json does not hold a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema_version {version!r} is not supported "
                f"(this enginekit reads version {SCHEMA_VERSION})"
            )
        for key in ("kind", "task", "family", "components"):
            if key not in data:
                raise ManifestError(f"manifest.json has no {key!r} field")
        if data["kind"] not in ARTIFACT_KINDS:
            raise ManifestError(
                f"manifest kind {data['kind']!r} is unknown; expected one of {', '.join(ARTIFACT_KINDS)}"
            )
        try:
            components = {n: Component.from_dict(n, c) for n, c in data["components"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"manifest.json has a malformed component: {exc!r}") from exc
        if not components:
            raise ManifestError("manifest.json lists no components")
        labels = data.get("labels")
        return cls(
            kind=data["kind"],
            task=data["task"],
            family=data["family"],
            components=components,
            preprocessing=data.get("preprocessing"),
            labels=tuple(str(x) for x in labels) if labels is not None else None,
            provenance=data.get("provenance") or {},
            target=data.get("target") or {},
            quantization=data.get("quantization"),
            fidelity=data.get("fidelity") or {},
            extra=data.get("extra") or {},
            schema_version=version,
        )


def read_manifest(artifact: str | Path) -> Manifest:
    """Read and validate ``artifact/manifest.json``."""
    root = Path(artifact)
    if not root.exists():
        raise ManifestError(f"{root}: no such artifact folder")
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder (an artifact is a folder with a manifest.json)")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{root}: no {MANIFEST_NAME} (not an enginekit artifact, or an interrupted write)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from exc
    return Manifest.from_dict(data)
