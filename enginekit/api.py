"""The library entry points behind the CLI: ``load`` and ``compile_artifact``.

Neither imports torch, nor any stage module: they read a manifest, verify
every file's sha256, find the task class and the backend in their registries,
and hand the folder to the backend.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

from enginekit.artifact import atomic_artifact, check_digest, copy_assets, verify_artifact, write_manifest
from enginekit.engine import Backend, CompileOptions, Runner
from enginekit.errors import BackendError, BackendUnavailableError, DeviceError, InputError
from enginekit.hardware import fingerprint
from enginekit.interface import carry_interfaces, with_interface
from enginekit.manifest import Manifest, read_manifest
from enginekit.registry import backend_class, backend_names, get_backend, task_class, task_stages
from enginekit.registry import stage as task_stage

__all__ = ["load", "load_runner", "compile_artifact", "default_backend", "resolve_device", "Components"]

log = logging.getLogger("enginekit")

#: Which backend runs an artifact kind when none is named.
_DEFAULT_BACKEND = {"onnx": "onnxruntime", "onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}


def default_backend(manifest: Manifest) -> str:
    return _DEFAULT_BACKEND[manifest.kind]


def resolve_device(backend: Backend, device: str) -> str:
    """``'auto'`` picks the backend's best device here, in the order of
    :meth:`Backend.devices` (a GPU before the CPU); anything else is checked by the
    backend. ``AUTO`` spelled as a backend's own plugin is called (OpenVINO's AUTO)
    hands the choice to that plugin; any other spelling of auto is enginekit's pick."""
    if device.lower() == "auto" and device == backend.native_auto:
        return device
    available = backend.devices()
    if device.lower() == "auto":
        if not available:
            raise DeviceError(f"{backend.name}: no usable device on this machine")
        log.info("%s: device 'auto' picked %r (available: %s)", backend.name, available[0], ", ".join(available))
        return available[0]
    return device


def check_load_arguments(path: Any, digest: Any = None, verify_with: Any = None) -> None:
    """One-line :class:`InputError` for arguments of the wrong type (``load(None)``,
    ``load(5)``, ``digest=5``), before any file is touched."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise InputError(f"load() takes an artifact folder path (str or os.PathLike), got {type(path).__name__}")
    if digest is not None and not isinstance(digest, str):
        raise InputError(f"digest must be the manifest digest as a string ('sha256:HEX', what "
                         f"'enginekit inspect' prints), got {type(digest).__name__}")
    if verify_with is not None and (isinstance(verify_with, bytes) or not isinstance(verify_with, (str, os.PathLike))):
        raise InputError(f"verify_with must be the path of a public key file, got {type(verify_with).__name__}")


def _open(path: str | Path, backend: str | None, digest: str | None = None,
          verify_with: str | Path | None = None, hash_all: bool = False) -> tuple[Path, Manifest, Backend]:
    """Read and verify the artifact (against a pinned digest or a signature when given),
    and pick the backend that loads it."""
    check_load_arguments(path, digest, verify_with)
    root = Path(path)
    manifest = read_manifest(root)
    if digest is not None:
        check_digest(root, manifest, digest)
    if verify_with is not None:
        from enginekit.signing import verify_signature

        verify_signature(root, verify_with)
    # A pinned or signed load hashes every file: a remembered check (the verified-file cache)
    # is only as trustworthy as the user account that wrote it, which a pin must not depend on.
    full = hash_all or digest is not None or verify_with is not None
    verify_artifact(root, manifest, full=True if full else None)
    name = backend or default_backend(manifest)
    try:
        be = get_backend(name)
    except BackendUnavailableError:
        if backend is not None:
            raise
        # Not asked for a backend: any installed one that loads this kind (an ONNX export runs
        # on OpenVINO in an OpenVINO-only install), said in the log.
        other = next((n for n in backend_names() if n != name and _loads_here(n, manifest.kind)), None)
        if other is None:
            raise
        log.info("%s is not installed; running this %s artifact on %s, which loads it", name, manifest.kind, other)
        name, be = other, get_backend(other)
    if manifest.kind not in be.loads:
        raise BackendError(
            f"backend {name!r} cannot load a {manifest.kind!r} artifact (it loads: {', '.join(be.loads)}); "
            f"compile it first: enginekit compile {root} --backend {name} -o OUT"
        )
    return root, manifest, be


def _loads_here(name: str, kind: str) -> bool:
    """Whether backend ``name`` is installed and loads ``kind`` artifacts (a plugin that does not import: no)."""
    try:
        cls = backend_class(name)
        return kind in getattr(cls, "loads", ()) and cls.is_available()
    except (ImportError, AttributeError):
        return False


class Components(Mapping[str, Runner]):
    """The named runners of one verified artifact, each loaded when first used.

    ``components["unet"]`` opens that component on first access and keeps it;
    a pipeline that never touches its VAE encoder never loads it.
    :attr:`loaded` tells which are open; :meth:`release` closes one (the next access
    opens it again); :meth:`close` closes them all.

    ``low_memory=True`` opens each with the backend's settings for the least resident
    memory (:meth:`Backend.load_low_memory`), and tells a task that it should release
    what it is done with (a pipeline frees its text encoders once the prompt is encoded).
    """

    def __init__(self, root: Path, manifest: Manifest, backend: Backend, device: str,
                 low_memory: bool = False) -> None:
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.device = device
        self.low_memory = low_memory
        self._runners: dict[str, Runner] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Runner:
        runner = self._runners.get(name)
        if runner is not None:
            return runner
        with self._lock:
            if name not in self._runners:
                self.manifest.component(name)  # a clear error for a name the artifact lacks
                log.info("%s: loading component %r on %s:%s%s", self.root, name, self.backend.name, self.device,
                         " (low memory)" if self.low_memory else "")
                load = self.backend.load_low_memory if self.low_memory else self.backend.load
                self._runners[name] = with_interface(load(self.root, self.manifest, self.device, name),
                                                     self.manifest.component(name))
            return self._runners[name]

    def cut(self, name: str, cut: Any) -> Runner:
        """A graph derived from component ``name`` (cut by ``cut``, see
        :mod:`enginekit.runtimes.graph_cut`, or tapped, see :mod:`enginekit.runtimes.attention_taps`),
        opened on first use and kept beside the component; released with it."""
        key = cut.key(name)
        runner = self._runners.get(key)
        if runner is not None:
            return runner
        with self._lock:
            if key not in self._runners:
                self.manifest.component(name)
                log.info("%s: loading %r on %s:%s", self.root, key, self.backend.name, self.device)
                self._runners[key] = with_interface(
                    self.backend.load_cut(self.root, self.manifest, self.device, name, cut, low_memory=self.low_memory),
                    self.manifest.component(name))
            return self._runners[key]

    def release(self, *names: str) -> None:
        """Close these components (and the parts of them opened by :meth:`cut`) if open, so their
        memory goes back; a later access opens them again. Names that are not open are skipped."""
        with self._lock:
            runners = [(n, self._runners.pop(n)) for n in list(self._runners)
                       if n in names or n.split("#")[0] in names]
        for name, runner in runners:
            log.info("%s: releasing component %r", self.root, name)
            runner.close()
        if runners:
            _give_back_freed_memory()

    def open_runners(self) -> list[Runner]:
        """The runners open now, without opening any (what a watcher interrupting a run asks for:
        a low-memory pipeline opens and releases components as it goes)."""
        with self._lock:
            return list(self._runners.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifest.components)

    def __len__(self) -> int:
        return len(self.manifest.components)

    def __contains__(self, name: object) -> bool:
        return name in self.manifest.components

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._runners)

    def close(self) -> None:
        with self._lock:
            for runner in self._runners.values():
                runner.close()
            self._runners.clear()


def _give_back_freed_memory() -> None:
    """Ask glibc to return the free pages at the top of its heaps to the kernel (``malloc_trim``):
    a closed engine's weights were often malloc'ed in pieces under glibc's mmap threshold, and
    without this the process keeps them resident for the next allocations. A no-op elsewhere."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()  # the runner's session object goes now, not at the next collection
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


def load_runner(
    path: str | Path, device: str = "auto", backend: str | None = None, component: str | None = None
) -> tuple[Runner, Manifest]:
    """Verify the artifact at ``path`` and open one component (the only one by default) as a bare :class:`Runner`."""
    root, manifest, be = _open(path, backend)
    runner = be.load(root, manifest, resolve_device(be, device), component)
    return with_interface(runner, manifest.component(component)), manifest


def load(path: str | Path, device: str = "auto", backend: str | None = None, *, digest: str | None = None,
         verify_with: str | Path | None = None, hash_all: bool = False, low_memory: bool = False,
         **options: Any) -> Any:
    """Open an artifact folder and return its task object.

    The manifest's ``task`` picks the class from the task registry
    (``image-classification`` -> :class:`ImageClassifier`, ``text-to-image`` ->
    :class:`TextToImage`); ``options`` go to it (``batch_size=`` for a classifier).
    ``device='auto'`` picks the backend's best device (a GPU before the CPU) and
    records it as ``.device``; ``backend`` defaults to the one the artifact kind
    was built for (plain ONNX runs on ONNX Runtime). Every file's sha256 is
    checked before a backend parses it; components load when first used.

    ``digest`` pins the artifact: the manifest's digest (what ``enginekit
    inspect`` prints; it covers every file's sha256) must equal it.
    ``verify_with`` names a public key (PEM): the artifact's signature (written
    by ``enginekit sign``) must be present and verify. Either refusal is an
    :class:`~enginekit.errors.IntegrityError`. A pinned or signed load, or one with
    ``hash_all=True`` (what ``enginekit serve`` does), hashes every file instead of trusting
    the verified-file cache, whose records are only as trustworthy as the account that
    wrote them.

    ``low_memory=True`` trades speed for resident memory: every component opens with the
    backend's memory-lean settings, and a pipeline opens each component for the step that
    needs it and closes it right after (text encoders once the prompt is encoded, the
    denoiser before the VAE decodes), so each call opens them again. The images are the
    same; one call at a time runs.
    """
    if not isinstance(hash_all, bool):
        raise InputError(f"hash_all must be True or False, got {hash_all!r}")
    if not isinstance(low_memory, bool):
        raise InputError(f"low_memory must be True or False, got {low_memory!r}")
    root, manifest, be = _open(path, backend, digest=digest, verify_with=verify_with, hash_all=hash_all)
    cls = task_class(manifest.task)
    try:
        inspect.signature(cls.from_artifact).bind(None, manifest, root, **options)
    except TypeError as exc:
        raise InputError(f"load(): a {manifest.task} artifact does not take those options ({exc})") from None
    components = Components(root, manifest, be, resolve_device(be, device), low_memory=low_memory)
    try:
        return cls.from_artifact(components, manifest, root, **options)
    except BaseException:
        components.close()
        raise


def compile_artifact(
    path: str | Path,
    backend: str,
    out_dir: str | Path,
    options: CompileOptions = CompileOptions(),
    overwrite: bool = False,
    parent: Mapping[str, Any] | None = None,
) -> Manifest:
    """Compile the artifact at ``path`` for ``backend`` into ``out_dir`` (written atomically).

    ``parent`` replaces the provenance's record of the artifact compiled from (a caller
    that compiles a temporary intermediate names the artifact it came from instead)."""
    root = Path(path)
    manifest = read_manifest(root)
    verify_artifact(root, manifest)
    be = get_backend(backend)
    if manifest.kind not in be.compiles:
        raise BackendError(f"{root}: {be.name} compiles {' or '.join(be.compiles)} artifacts, "
                           f"this one is {manifest.kind!r}")
    be.options(options.extra)  # refuse an unknown or mistyped option before any work
    check_compile_request(be, options)
    with atomic_artifact(out_dir, overwrite=overwrite, inputs=(root,)) as tmp:
        compiled = carry_interfaces(manifest, be.compile(root, manifest, tmp, options))
        copy_assets(root, tmp, manifest)
        provenance = dict(compiled.provenance)
        provenance["parent"] = dict(parent) if parent is not None else {
            "path": str(root.resolve()), "manifest_sha256": manifest.digest(), "kind": manifest.kind}
        provenance["tools"] = {**provenance.get("tools", {}), be.name: be.version()}
        provenance["host"] = fingerprint()
        compiled = compiled.replace(provenance=provenance)
        if task_stages(manifest.task).relink:  # e.g. the LoRA weight map, in the new engine's names
            compiled = task_stage(manifest.task, "relink")(root, manifest, tmp, compiled)
        write_manifest(tmp, compiled)
    warm_cache(out_dir, options.device)
    return compiled


#: The largest static batch an engine is built for: the exporters trace the batch axis up
#: to 4096, and a static batch allocates that many inputs on every call.
MAX_STATIC_BATCH = 4096
def check_compile_request(be: Backend, options: CompileOptions) -> None:
    """Refuse, before anything is written, a compile whose engine could never load: a
    static batch past :data:`MAX_STATIC_BATCH`, or a device this machine lacks."""
    batch = options.extra.get("static_batch")
    if isinstance(batch, int) and not isinstance(batch, bool) and batch > MAX_STATIC_BATCH:
        raise InputError(f"--batch {batch} is over {MAX_STATIC_BATCH}, the largest static batch enginekit builds "
                         "(the export traces the batch axis up to it; a static batch allocates every row per call)")
    if str(options.device).lower() != "auto" and options.device != be.native_auto:
        be.check_device(options.device)


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
