"""The library entry points behind the CLI: ``load`` and ``compile_artifact``.

Neither imports torch: they read a manifest, verify every file's sha256, and
hand the folder to a backend.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from enginekit.artifact import atomic_artifact, verify_artifact, write_manifest
from enginekit.hardware import fingerprint
from enginekit.errors import BackendError, DeviceError, ManifestError
from enginekit.manifest import Manifest, read_manifest
from enginekit.registry import get_backend
from enginekit.runtimes.base import Backend, CompileOptions, Runner

__all__ = ["load", "load_runner", "compile_artifact", "default_backend", "resolve_device"]

log = logging.getLogger("enginekit")

#: Which backend runs an artifact kind when none is named.
_DEFAULT_BACKEND = {"onnx": "onnxruntime", "onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}


def default_backend(manifest: Manifest) -> str:
    return _DEFAULT_BACKEND[manifest.kind]


def resolve_device(backend: Backend, device: str) -> str:
    """``'auto'`` picks the backend's best device here, in the order of
    :meth:`Backend.devices` (a GPU before the CPU); anything else is checked."""
    available = backend.devices()
    if device == "auto":
        if not available:
            raise DeviceError(f"{backend.name}: no usable device on this machine")
        log.info("%s: device 'auto' picked %r (available: %s)", backend.name, available[0], ", ".join(available))
        return available[0]
    return device


def load_runner(path: str | Path, device: str = "auto", backend: str | None = None) -> tuple[Runner, Manifest]:
    """Verify the artifact at ``path`` and open it as a bare :class:`Runner`."""
    root = Path(path)
    manifest = read_manifest(root)
    verify_artifact(root, manifest)
    name = backend or default_backend(manifest)
    be = get_backend(name)
    if manifest.kind not in be.loads:
        raise BackendError(
            f"backend {name!r} cannot load a {manifest.kind!r} artifact (it loads: {', '.join(be.loads)}); "
            f"compile it first: enginekit compile {root} --backend {name} -o OUT"
        )
    runner = be.load(root, manifest, resolve_device(be, device))
    return runner, manifest


def load(path: str | Path, device: str = "auto", backend: str | None = None, batch_size: int = 8) -> Any:
    """Open an artifact folder and return its task object.

    ``device='auto'`` picks the backend's best device (a GPU before the CPU) and
    records it as ``.device``; ``backend`` defaults to the one the artifact kind
    was built for (plain ONNX runs on ONNX Runtime). Every file's sha256 is
    checked before a backend parses it.
    """
    runner, manifest = load_runner(path, device, backend)
    if manifest.task == "image-classification":
        from enginekit.runtimes.classifier import ImageClassifier

        try:
            return ImageClassifier(runner, manifest, Path(path), batch_size=batch_size)
        except Exception:
            runner.close()
            raise
    runner.close()
    raise ManifestError(f"{path}: task {manifest.task!r} is not supported by this enginekit")


def compile_artifact(
    path: str | Path,
    backend: str,
    out_dir: str | Path,
    options: CompileOptions = CompileOptions(),
    overwrite: bool = False,
) -> Manifest:
    """Compile the artifact at ``path`` for ``backend`` into ``out_dir`` (written atomically)."""
    root = Path(path)
    manifest = read_manifest(root)
    verify_artifact(root, manifest)
    be = get_backend(backend)
    if manifest.kind not in be.compiles:
        raise BackendError(f"{root}: {be.name} compiles {' or '.join(be.compiles)} artifacts, "
                           f"this one is {manifest.kind!r}")
    with atomic_artifact(out_dir, overwrite=overwrite) as tmp:
        compiled = be.compile(root, manifest, tmp, options)
        provenance = dict(compiled.provenance)
        provenance["parent"] = {"path": str(root.resolve()), "manifest_sha256": manifest.digest(), "kind": manifest.kind}
        provenance["tools"] = {**provenance.get("tools", {}), be.name: be.version()}
        provenance["host"] = fingerprint()
        compiled = compiled.replace(provenance=provenance)
        write_manifest(tmp, compiled)
    warm_cache(out_dir, options.device)
    return compiled


def warm_cache(path: str | Path, device: str = "cpu") -> bool:
    """Fill this machine's model cache for the artifact at ``path`` (OpenVINO's compiled
    blob), so its first load here skips the device compilation. Best effort: True when
    the cache was filled, False where the backend keeps none, the device is not here or
    warming failed (logged; the artifact itself is complete either way)."""
    root = Path(path)
    try:
        manifest = read_manifest(root)
        be = get_backend(default_backend(manifest))
        return be.warm(root, manifest, device)
    except Exception as exc:  # a cache is an optimisation: never fail the stage that wrote the artifact
        log.warning("could not fill the model cache for %s: %s", root, exc)
        return False
