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

from enginekit.errors import IntegrityError, ManifestError, one_line

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

SCHEMA_VERSION = 2
#: Versions this enginekit reads. Version 1 kept the classifier's preprocessing
#: and labels at the top level; they now live in the task's own section.
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
#: What an artifact folder can hold. ``onnx`` is an exported (or quantized)
#: ONNX graph that ONNX Runtime runs as is; the others are compiled engines.
ARTIFACT_KINDS = ("onnx", "onnxruntime", "openvino", "tensorrt")


def _backend_writes(kind: str) -> bool:
    """Whether a registered backend (one added at run time, say) compiles artifacts of ``kind``."""
    from enginekit.registry import backend_for_kind

    return backend_for_kind(kind) is not None


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
    #: How this component was quantized (method, bits, calibration), or None for float.
    quantization: Mapping[str, Any] | None = None
    #: This component's own numbers against its reference (cosine, max abs, budget, data).
    fidelity: Mapping[str, Any] = field(default_factory=dict)
    #: How the engine's own interface meets the names the task uses, for an engine another
    #: tool wrote (``enginekit import``): ``inputs`` and ``outputs`` map a task name to the
    #: engine's (``{"pooled": "text_embeds"}``), ``one_row`` lists inputs the engine takes as
    #: one row for the whole batch (optimum's UNet ``timestep``). Empty for enginekit's own
    #: engines, whose ``inputs``/``outputs`` are the task's names; see :mod:`enginekit.interface`.
    interface: Mapping[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    def replace(self, **changes: Any) -> Component:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "entry": self.entry,
            "files": [f.to_dict() for f in self.files],
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "precision": self.precision,
            "quantization": dict(self.quantization) if self.quantization is not None else None,
            "fidelity": dict(self.fidelity),
            # Written only when set, so the digest of every manifest without one is unchanged.
            **({"interface": _jsonable(self.interface)} if self.interface else {}),
        }

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Component:
        quant = data.get("quantization")
        return cls(
            name=name,
            entry=str(data["entry"]),
            files=tuple(FileEntry.from_dict(f) for f in data["files"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            precision=str(data.get("precision", "fp32")),
            quantization=dict(quant) if quant is not None else None,
            fidelity=dict(data.get("fidelity") or {}),
            interface=_interface(name, data.get("interface")),
        )


def _interface(component: str, data: Any) -> dict[str, Any]:
    """A component's ``interface`` checked: name maps of strings and a list of input names."""
    if not data:
        return {}
    where = f"manifest.json component {component!r} interface"
    if not isinstance(data, Mapping) or set(data) - {"inputs", "outputs", "one_row"}:
        raise ManifestError(f"{where}: expected an object with 'inputs', 'outputs' and 'one_row'")
    out: dict[str, Any] = {}
    for key in ("inputs", "outputs"):
        names = data.get(key) or {}
        if not isinstance(names, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
            raise ManifestError(f"{where}: {key} must map the task's names to the engine's")
        if len(set(names.values())) != len(names):
            raise ManifestError(f"{where}: {key} names one engine tensor twice")
        if names:
            out[key] = dict(names)
    rows = data.get("one_row") or []
    if isinstance(rows, (str, bytes)) or not isinstance(rows, (list, tuple)) or not all(isinstance(n, str) for n in rows):
        raise ManifestError(f"{where}: one_row must be a list of input names")
    if rows:
        out["one_row"] = list(rows)
    return out


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of an artifact folder.

    ``task_config`` is the task's own section, stored under the task's name
    (``"image-classification": {"preprocessing": ..., "labels": ...}``,
    ``"text-to-image": {"scheduler": ..., "text_encoders": ...}``): what the
    task object needs and no other artifact has to carry. ``assets`` are the
    non-engine files the task reads (tokenizers, scheduler config), hashed and
    verified like payload files.

    The free-form sections (``provenance``, ``target``, ``quantization``,
    ``fidelity``) are plain JSON objects so that stages can add what they
    measure without a schema change.
    """

    kind: str
    task: str
    family: str
    components: Mapping[str, Component]
    task_config: Mapping[str, Any] = field(default_factory=dict)
    assets: tuple[FileEntry, ...] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)
    target: Mapping[str, Any] = field(default_factory=dict)
    quantization: Mapping[str, Any] | None = None
    fidelity: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # The classifier's section, read through the old names.
    @property
    def preprocessing(self) -> Mapping[str, Any] | None:
        return self.task_config.get("preprocessing")

    @property
    def labels(self) -> tuple[str, ...] | None:
        labels = self.task_config.get("labels")
        return tuple(labels) if labels is not None else None

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

    def asset(self, path: str) -> FileEntry:
        """The asset recorded under ``path`` (relative to the artifact folder)."""
        for entry in self.assets:
            if entry.path == path:
                return entry
        raise ManifestError(f"artifact lists no asset {path!r}")

    def replace(self, **changes: Any) -> Manifest:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": self.kind,
            "task": self.task,
            "family": self.family,
            "components": {n: c.to_dict() for n, c in self.components.items()},
            "assets": [a.to_dict() for a in self.assets],
            self.task: _jsonable(self.task_config),
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
        if version not in READABLE_VERSIONS:
            raise ManifestError(
                f"manifest schema_version {version!r} is not supported "
                f"(this enginekit reads versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        for key in ("kind", "task", "family", "components"):
            if key not in data:
                raise ManifestError(f"manifest.json has no {key!r} field")
        for key in ("kind", "task", "family"):
            if not isinstance(data[key], str):
                raise ManifestError(f"manifest.json field {key!r} must be a string")
        if data["kind"] not in ARTIFACT_KINDS and not _backend_writes(data["kind"]):
            raise ManifestError(
                f"manifest kind {data['kind']!r} is unknown; expected one of {', '.join(ARTIFACT_KINDS)} "
                "or the kind of a registered backend"
            )
        if not isinstance(data["components"], Mapping):
            raise ManifestError("manifest.json field 'components' must be an object of name -> component")
        try:
            components = {n: Component.from_dict(n, c) for n, c in data["components"].items()}
            assets = tuple(FileEntry.from_dict(a) for a in data.get("assets") or ())
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"manifest.json has a malformed component or asset: {exc!r}") from exc
        if not components:
            raise ManifestError("manifest.json lists no components")
        task = data["task"]
        if version == 1:  # the classifier's fields sat at the top level
            section: Any = {k: data[k] for k in ("preprocessing", "labels") if data.get(k) is not None}
        else:
            section = data.get(task) or {}
        if not isinstance(section, Mapping):
            raise ManifestError(f"manifest.json section {task!r} must be an object")
        for key in ("provenance", "target", "fidelity", "extra"):
            if data.get(key) is not None and not isinstance(data[key], Mapping):
                raise ManifestError(f"manifest.json field {key!r} must be an object")
        _check_target(data.get("target") or {})
        return cls(
            kind=data["kind"],
            task=task,
            family=data["family"],
            components=components,
            task_config=dict(section),
            assets=assets,
            provenance=data.get("provenance") or {},
            target=data.get("target") or {},
            quantization=data.get("quantization"),
            fidelity=data.get("fidelity") or {},
            extra=data.get("extra") or {},
            schema_version=version,
        )


#: Types of the target fields backends read when loading: a wrong one is refused
#: here in one line rather than as a traceback from ``int("x")`` in a backend.
_TARGET_INTS = ("intra_op_num_threads", "inter_op_num_threads", "inference_num_threads", "threads", "static_batch")
_TARGET_STRS = ("backend", "device", "performance_hint", "inference_precision_hint")


def _check_target(target: Mapping[str, Any]) -> None:
    for key in _TARGET_INTS:
        value = target.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ManifestError(f"manifest.json target.{key}: expected a non-negative integer, got {value!r}")
    for key in _TARGET_STRS:
        value = target.get(key)
        if value is not None and not isinstance(value, str):
            raise ManifestError(f"manifest.json target.{key}: expected a string, got {value!r}")


def _jsonable(value: Any) -> Any:
    """Tuples in a task section become lists, so a manifest round-trips to an equal digest."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _shown(path: Path) -> str:
    """A path fit for a one-line message: NUL and control bytes escaped, long ones shortened."""
    text = repr(str(path))[1:-1]
    return text if len(text) <= 200 else f"{text[:120]}...({len(text)} characters)...{text[-40:]}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return one_line(exc)


def read_manifest(artifact: str | Path) -> Manifest:
    """Read and validate ``artifact/manifest.json``."""
    root = Path(artifact)
    shown = _shown(root)
    try:
        exists, is_dir = root.exists(), root.is_dir()
    except (ValueError, OSError) as exc:  # a NUL byte; a name too long for the filesystem
        raise ManifestError(f"{shown}: not a usable path ({_reason(exc)})") from None
    if not exists:
        raise ManifestError(f"{root}: no such artifact folder")
    if not is_dir:
        raise ManifestError(f"{root}: not a folder (an artifact is a folder with a manifest.json)")
    path = root / MANIFEST_NAME
    try:
        is_file = path.is_file()
    except (ValueError, OSError) as exc:
        raise ManifestError(f"{shown}: not a usable path ({_reason(exc)})") from None
    if not is_file:
        if _foreign(root):
            raise ManifestError(f"{root}: no {MANIFEST_NAME}; it looks like a folder optimum-cli writes (OpenVINO or "
                                f"ONNX engines), which enginekit runs once imported: enginekit import {root} -o OUT "
                                "(or --adopt) checks it and hashes every file")
        raise ManifestError(f"{root}: no {MANIFEST_NAME} (not an enginekit artifact, or an interrupted write)")
    if path.is_symlink() and root.resolve() not in path.resolve().parents:
        # What a digest or signature of this folder covers must be in it: a manifest linked
        # from elsewhere could change under a pinned artifact without the folder changing.
        raise IntegrityError(f"{root}: {MANIFEST_NAME} is a symlink to a file outside the artifact folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from exc
    except RecursionError:
        raise ManifestError(f"{path}: unreadable manifest (JSON nested too deeply)") from None
    if _too_deep(data):
        raise ManifestError(f"{path}: unreadable manifest (JSON nested deeper than {_MAX_DEPTH} levels)")
    return Manifest.from_dict(data)


#: The engine files optimum-cli (OpenVINO) and optimum's ONNX export write, per component folder.
_FOREIGN_ENGINES = ("openvino_model.xml", "model.onnx")


def _foreign(root: Path) -> bool:
    """Whether ``root`` holds engines in optimum's layout (beside a config.json or model_index.json)."""
    try:
        if not ((root / "model_index.json").is_file() or (root / "config.json").is_file()):
            return False
        return any((root / name).is_file() or any(root.glob(f"*/{name}")) for name in _FOREIGN_ENGINES)
    except OSError:
        return False


#: No manifest enginekit writes nests deeper than a few levels; a deeper one would make
#: every later walk of it (digest, printing) recurse toward Python's limit.
_MAX_DEPTH = 64


def _too_deep(data: Any) -> bool:
    """Whether ``data`` nests lists/objects deeper than :data:`_MAX_DEPTH` (checked without recursion)."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > _MAX_DEPTH:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False
