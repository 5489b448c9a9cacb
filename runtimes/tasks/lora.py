"""LoRA at run time: ``pipe(prompt, loras={"ink.safetensors": 0.8})`` without a new export.

How (measured in docs/lora-runtime.md): each LoRA layer's update ``scale * alpha/rank * up @ down``
is summed per weight and added to the base weight, and the patched component is opened as a
second engine beside the base one (ONNX Runtime: a session whose initializers are overridden;
OpenVINO: the IR's Constants replaced, compiled again). The artifact's ``lora_map.json`` (written
at export, relinked at compile, :mod:`enginekit.runtimes.lora_map`) says which graph tensor holds
each module's weight. A call without ``loras`` runs the base engines, untouched: the same image
as a fresh load. Per call only the components a LoRA touches are swapped, through an overlay of
the pipeline's components that is local to the calling thread (a concurrent call without LoRA
still sees the base engines).

What is kept (bounded, for 24 GB boxes): the patched engines of the last ``cache_size``
combinations (each file's sha256 and scale; default 1: one patched copy of each touched
component beside the base), so a repeat costs nothing; parsed files, at most ``_FILES_KEPT``.
A low-memory pipeline keeps none: it opens the patched engines for the call and closes them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from enginekit.errors import InputError
from enginekit.runtimes.lora_files import LoraFile, is_sgm, kohya_names, read_lora
from enginekit.runtimes.lora_map import engine_tensors, read_map, to_graph_layout

__all__ = ["LoraSwitch", "LoraOverlay", "check_loras", "parse_lora_arg", "MAX_SCALE"]

MAX_SCALE = 10.0
_FILES_KEPT = 8


def check_loras(loras: Any) -> list[tuple[Any, float]]:
    """``loras`` as (file, scale) pairs: a mapping of path (or bytes) to scale, or pairs."""
    if loras is None:
        return []
    items = list(loras.items()) if isinstance(loras, Mapping) else loras
    if not isinstance(items, (list, tuple)):
        raise InputError(f"loras must be a mapping of LoRA file to scale, got {type(loras).__name__}")
    out = []
    for item in items:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise InputError("loras must map each LoRA file to its scale ({'ink.safetensors': 0.8})")
        source, scale = item
        if not isinstance(source, (str, Path, bytes, bytearray)):
            raise InputError(f"a LoRA is a file path or the file's bytes, got {type(source).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) \
                or not math.isfinite(float(scale)) or not -MAX_SCALE <= float(scale) <= MAX_SCALE:
            raise InputError(f"LoRA {_label(source)}: scale must be a number between -{MAX_SCALE:g} and "
                             f"{MAX_SCALE:g}, got {scale!r}")
        out.append((source, float(scale)))
    return out


def parse_lora_arg(text: str, default_scale: float = 1.0) -> tuple[str, float]:
    """``FILE[:SCALE]``, as ``generate --lora`` (and ``export --lora``) take it; a colon followed by
    something that is not a number is part of the file name."""
    path, scale = text, default_scale
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("/", "\\")):
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    return str(Path(path).expanduser()), scale


def _label(source: Any) -> str:
    return "(bytes)" if isinstance(source, (bytes, bytearray)) else str(source)


class LoraOverlay(Mapping[str, Any]):
    """The pipeline's components, with the calling thread's patched engines in front."""

    def __init__(self, base: Mapping[str, Any]) -> None:
        self.base = base
        self.active: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("loras", default=None)

    def __getitem__(self, name: str) -> Any:
        active = self.active.get()
        if active is not None and name in active:
            return active[name]
        return self.base[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __getattr__(self, name: str) -> Any:  # release, cut, loaded, backend, device, low_memory, close
        return getattr(self.base, name)

    def cut(self, name: str, cut: Any) -> Any:
        active = self.active.get()
        if active is not None and name in active:
            raise InputError("DeepCache (cache='deepcache:N') does not run with loras yet; use taylorseer or none")
        return self.base.cut(name, cut)


class _Entry:
    def __init__(self, runners: dict[str, Any]) -> None:
        self.runners = runners
        self.users = 0
        self.evicted = False

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
        self.runners = {}


class LoraSwitch:
    """Applies LoRA files per call to one :class:`TextToImage` (see the module docstring)."""

    def __init__(self, pipe: Any, cache_size: int = 1) -> None:
        self.pipe = pipe
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._files: OrderedDict[str, LoraFile] = OrderedDict()
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self._map: dict[str, Any] | None = None
        self._left_out: dict[str, int] = {}
        self._kohya: dict[str, dict[str, str]] = {}
        #: What the last call with loras applied: [{"name", "sha256", "short_hash", "scale", "layers"}].
        self.last: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- reading and checking

    def _weight_map(self) -> dict[str, Any]:
        if self._map is None:
            data = read_map(self.pipe.path, self.pipe.manifest)
            if data is None:
                raise InputError(f"{self.pipe.path} was exported without the weight map that LoRA at run time "
                                 "needs; export it again with this enginekit (or fuse the LoRA: export --lora)")
            self._map = data["components"]
            self._left_out = dict(data.get("left_out") or {})
            self._kohya = {comp: kohya_names(modules) for comp, modules in self._map.items()}
        return self._map

    def read(self, source: Any) -> LoraFile:
        """Parse a LoRA file (a path or bytes), keeping the last few parsed."""
        key = str(Path(source).expanduser().resolve()) if not isinstance(source, (bytes, bytearray)) else None
        if key is not None and Path(key).is_file():
            stat = Path(key).stat()
            key = f"{key}:{stat.st_size}:{stat.st_mtime_ns}"
            with self._lock:
                if key in self._files:
                    self._files.move_to_end(key)
                    return self._files[key]
        parsed = read_lora(source if not isinstance(source, bytearray) else bytes(source), _label(source))
        key = key or f"bytes:{parsed.sha256}"
        with self._lock:
            self._files[key] = parsed
            while len(self._files) > _FILES_KEPT:
                self._files.popitem(last=False)
        return parsed

    def resolve(self, lora: LoraFile) -> dict[tuple[str, str], Any]:
        """Each layer of ``lora`` as (component, module) of this artifact's map; refuses a file whose
        layer does not exist here (or has another shape), naming the first, and one that matches nothing."""
        maps = self._weight_map()
        denoiser = self.pipe.config.denoiser
        out: dict[tuple[str, str], Any] = {}
        first_bad: str | None = None
        for (component, module), layer in lora.layers.items():
            comp = denoiser if component == "denoiser" else component
            modules = maps.get(comp, {})
            name = _find(module, modules, self._kohya.get(comp, {}))
            if name is None:
                if first_bad is None:
                    where = f"{comp}" if comp in maps else f"{comp} (this {self.pipe.manifest.family} pipeline has none)"
                    first_bad = f"layer {module!r} of the {where} does not exist in this model"
                    if self._left_out.get(comp):
                        first_bad = (f"layer {module!r} of the {comp} is not a float weight in this engine "
                                     f"({self._left_out[comp]} of its weights were quantized into a form LoRA "
                                     "cannot patch: ONNX Runtime's int8/int4; OpenVINO's int8/int4 engines take "
                                     "LoRA at run time, or fuse it at export: export --lora)")
                    if is_sgm(module):
                        first_bad += " (kohya's sgm UNet names are not read yet)"
                continue
            shape = tuple(modules[name]["shape"])
            got = (layer.up.shape[0], *layer.down.shape[1:])
            if got != shape[:len(got)] or int(np.prod(got)) != int(np.prod(shape)):
                if first_bad is None:
                    first_bad = f"layer {module!r} has shape {got}, this model's {comp}.{name} is {shape}"
                continue
            out[(comp, name)] = layer
        if not out:
            raise InputError(f"LoRA {lora.name}: none of its {len(lora.layers)} layers matches a module of this "
                             f"{self.pipe.manifest.family} pipeline ({first_bad}); is it for another model?")
        if first_bad is not None:
            raise InputError(f"LoRA {lora.name}: does not fit this {self.pipe.manifest.family} pipeline: {first_bad}")
        return out

    # ---------------------------------------------------------------- the call

    @contextlib.contextmanager
    def applied(self, loras: Any) -> Iterator[list[dict[str, Any]]]:
        """Run the block with ``loras`` applied (nothing: the base engines); yields what was applied."""
        pairs = check_loras(loras)
        if not pairs:
            yield []
            return
        files = [(self.read(source), scale) for source, scale in pairs]
        resolved = [self.resolve(f) for f, _ in files]
        applied = [{"name": f.name, "sha256": f.sha256, "short_hash": f.short_hash, "scale": s,
                    "format": f.format, "layers": len(r)} for (f, s), r in zip(files, resolved)]
        key = tuple(sorted((f.sha256, s) for f, s in files if s != 0.0))
        overlay = self._overlay()
        entry = self._entry(key, files, resolved) if key else _Entry({})
        token = overlay.active.set(entry.runners)
        try:
            self.last = applied
            yield applied
        finally:
            overlay.active.reset(token)
            self._done(entry, key)

    def _overlay(self) -> LoraOverlay:
        with self._lock:
            if not isinstance(self.pipe.components, LoraOverlay):
                self.pipe.components = LoraOverlay(self.pipe.components)
            return self.pipe.components

    def _entry(self, key: tuple, files: list[tuple[LoraFile, float]], resolved: list[dict]) -> _Entry:
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                entry.users += 1
                return entry
        entry = _Entry(self._build(files, resolved))  # built outside the lock: it takes seconds
        entry.users = 1
        if self.pipe.low_memory or self.cache_size < 1:
            entry.evicted = True  # closed when this call is done
            return entry
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                old.evicted = True
                if old.users == 0:
                    old.close()
            self._cache[key] = entry
            while len(self._cache) > self.cache_size:
                _, gone = self._cache.popitem(last=False)
                gone.evicted = True
                if gone.users == 0:
                    gone.close()
        return entry

    def _done(self, entry: _Entry, key: tuple) -> None:
        with self._lock:
            entry.users -= 1
            close = entry.evicted and entry.users <= 0
        if close:
            entry.close()

    def _build(self, files: list[tuple[LoraFile, float]], resolved: list[dict]) -> dict[str, Any]:
        """The patched engine of every component the LoRAs touch (nothing is kept if one fails)."""
        deltas: dict[str, dict[str, np.ndarray]] = {}
        for (_, scale), layers in zip(files, resolved):
            if scale == 0.0:
                continue
            for (comp, module), layer in layers.items():
                delta = layer.delta(scale)
                per = deltas.setdefault(comp, {})
                per[module] = per[module] + delta.reshape(per[module].shape) if module in per else delta
        pipe, maps = self.pipe, self._weight_map()
        components = pipe.components.base if isinstance(pipe.components, LoraOverlay) else pipe.components
        runners: dict[str, Any] = {}
        try:
            for comp, per in deltas.items():
                entries = {m: maps[comp][m] for m in per}
                entry_path = pipe.path / pipe.manifest.component(comp).entry
                base = dict(engine_tensors(entry_path, {e["tensor"] for e in entries.values()}))
                patched: dict[str, np.ndarray] = {}
                for module, e in entries.items():
                    value = base.get(e["tensor"])
                    if value is None:
                        raise InputError(f"{comp}'s weight {e['tensor']!r} ({module}) is no longer in its engine "
                                         "(quantized or rewritten since export): LoRA at run time needs the float "
                                         "weights; fuse it at export instead (export --lora)")
                    if value.dtype.kind != "f":
                        raise InputError(f"{comp}'s weights are quantized ({value.dtype}): LoRA at run time needs "
                                         "float (fp32/fp16) weights; fuse it at export instead (export --lora)")
                    graph = patched.get(e["tensor"], np.asarray(value, dtype=np.float32))
                    patched[e["tensor"]] = graph + to_graph_layout(per[module], e, value.shape)
                patched = {n: v.astype(base[n].dtype) for n, v in patched.items()}
                del base
                runners[comp] = components.backend.load_patched(pipe.path, pipe.manifest, components.device, comp,
                                                                patched, low_memory=pipe.low_memory)
        except BaseException:
            for runner in runners.values():
                runner.close()
            raise
        return runners

    def close(self) -> None:
        with self._lock:
            entries = list(self._cache.values())
            self._cache.clear()
        for entry in entries:
            entry.close()


def _find(module: str, modules: Mapping[str, Any], kohya: Mapping[str, str]) -> str | None:
    """The map's name for a LoRA layer's module path (dotted, or kohya's underscored)."""
    if module in modules:
        return module
    if module.startswith("text_model.") and module[len("text_model."):] in modules:
        return module[len("text_model."):]  # transformers 5 CLIP models dropped the text_model level
    if "text_model." + module in modules:
        return "text_model." + module
    return kohya.get(module)
