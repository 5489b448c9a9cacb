"""Streaming export: a component's graph is traced with fake weights and its weights are streamed,
one tensor at a time, into the external data file, so the model is never whole in memory.

1. The component is built with no storage: every parameter is a fake CPU tensor (shape and dtype,
   no data; buffers stay real, they are small and some are computed in ``__init__``), see
   :func:`empty_module`. ``torch.onnx.export(dynamo=True)`` traces it as it would the real one.
2. The graph is optimised as the in-memory export optimises it, with the small weights (those the
   constant folder may read) loaded and the large ones hidden from it; a ``Transpose`` of a large
   weight, which the folder always folds, is folded here into a lazily transposed initializer.
3. ``onnx_ir`` writes ``model.onnx.data`` tensor by tensor; each large initializer is a lazy
   tensor read from its :class:`WeightSource` (memory-mapped safetensors, or drawn from a generator
   seeded per tensor for ``--random-weights``) when its turn comes, and dropped after.

Peak memory is the graph plus the largest tensor (times two while it is cast or transposed).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from enginekit.errors import ExportError, SourceError, one_line

__all__ = ["DATA_FILE", "SafetensorsWeights", "SeededWeights", "SingleFileWeights", "WeightSource", "empty_module",
           "export_streamed", "fake_mode", "load_persistent_buffers", "record_conversion", "reseed_", "seeded_tensor"]

#: The external data file beside each component's ``model.onnx`` (the in-memory export's name).
DATA_FILE = "model.onnx.data"
#: Tensors at or under this many bytes stay inside model.onnx (the in-memory export's threshold).
_INLINE_BYTES = 1024
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


# --------------------------------------------------------------------------- seeded weights


def tensor_seed(seed: int, component: str, name: str) -> int:
    """The generator seed of one tensor: the same (seed, component, name) gives the same draw,
    whatever was drawn before it, so a tensor can be drawn alone."""
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_tensor(seed: int, component: str, name: str, shape: tuple[int, ...]) -> Any:
    """One fp32 weight drawn from its own generator, on the scale PyTorch's default init gives:
    a matrix or kernel uniform in ±1/sqrt(fan_in), a norm scale (1-D ``weight``) near 1, any
    other vector (a bias) uniform in ±1/sqrt(length)."""
    import torch

    gen = torch.Generator().manual_seed(tensor_seed(seed, component, name))
    u = torch.rand(shape, generator=gen, dtype=torch.float32)
    if len(shape) >= 2:
        bound = 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
        return u.mul_(2 * bound).sub_(bound)
    if len(shape) == 1 and name.endswith(("weight", "scale", "gamma")):
        return u.mul_(0.2).add_(0.9)
    bound = 1.0 / math.sqrt(max(1, math.prod(shape)))
    return u.mul_(2 * bound).sub_(bound)


def reseed_(module: Any, seed: int, component: str) -> None:
    """Overwrite every parameter of ``module`` (in place) with its :func:`seeded_tensor`: the
    in-memory builder's weights, identical to those :class:`SeededWeights` streams."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(seeded_tensor(seed, component, name, tuple(param.shape)).to(param.dtype))


# --------------------------------------------------------------------------- weight sources


class WeightSource(Protocol):
    """Where a component's weights come from, one tensor at a time."""

    def describe(self) -> str: ...

    def get(self, names: tuple[str, ...], shape: tuple[int, ...]) -> Any:
        """The tensor stored under the first of ``names`` it holds (a state-dict name, then the
        names it is tied to), checked against ``shape``."""
        ...


@dataclass(frozen=True)
class SeededWeights:
    """``--random-weights``: each tensor drawn from a generator seeded by (seed, component, name)."""

    seed: int
    component: str

    def describe(self) -> str:
        return f"seeded per tensor (seed {self.seed})"

    def get(self, names: tuple[str, ...], shape: tuple[int, ...]) -> Any:
        return seeded_tensor(self.seed, self.component, names[0], shape)


#: Key prefixes a checkpoint may hold that the architecture's state dict does not (or the reverse):
#: transformers 5's CLIPTextModel has no "text_model." level, which hub checkpoints of SD's text
#: encoder (written by transformers 4) keep; transformers maps them when it loads, and so does this.
KEY_PREFIXES = ("text_model.",)


def key_candidates(names: tuple[str, ...]) -> tuple[str, ...]:
    """``names``, then each with a :data:`KEY_PREFIXES` prefix added (or removed where it has one)."""
    alts = [n[len(p):] if n.startswith(p) else p + n for n in names for p in KEY_PREFIXES]
    return tuple(dict.fromkeys((*names, *alts)))


class SafetensorsWeights:
    """A component folder's safetensors weights (one file, or shards with their
    ``*.safetensors.index.json``), each tensor read through a memory map when asked for; a key
    found under a checkpoint's own prefix (:data:`KEY_PREFIXES`) too."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files = self._index(folder)

    @staticmethod
    def _index(folder: Path) -> dict[str, Path]:
        from safetensors import safe_open

        indexes = sorted(p for p in folder.glob("*.safetensors.index.json") if p.name.count(".") == 3)
        if indexes:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8")).get("weight_map", {})
            return {key: folder / file for key, file in weight_map.items()}
        files = sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)
        if not files:
            pickled = sorted(p.name for p in folder.glob("*") if p.suffix in _PICKLE_SUFFIXES)
            why = f"only pickled weights ({', '.join(pickled)}), never unpickled" if pickled else "no .safetensors weights"
            raise SourceError(f"{folder}: {why}")
        out: dict[str, Path] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    out.update((key, path) for key in f.keys())
            except Exception as exc:  # SafetensorError for a corrupt header
                raise SourceError(f"{path}: not a readable safetensors file ({one_line(exc)})") from exc
        return out

    def keys(self) -> set[str]:
        return set(self._files)

    def describe(self) -> str:
        return f"safetensors ({self.folder})"

    def get(self, names: tuple[str, ...], shape: tuple[int, ...]) -> Any:
        from safetensors import safe_open

        key = next((n for n in key_candidates(names) if n in self._files), None)
        if key is None:
            raise SourceError(f"{self.folder}: no weight {names[0]!r} in its safetensors files")
        # Opened per tensor: the map is dropped with it, so the file's pages do not pile up in RSS.
        with safe_open(str(self._files[key]), framework="pt") as f:
            tensor = f.get_tensor(key)
        if tuple(tensor.shape) != tuple(shape):
            raise SourceError(f"{self.folder}: {key} has shape {tuple(tensor.shape)}, the architecture "
                              f"says {tuple(shape)} (another model size?)")
        return tensor


def load_persistent_buffers(module: Any, source: Any) -> None:
    """Copy the persistent buffers ``source`` holds into ``module``'s real ones (they are
    small: positional tables and the like; the built values stay for those it lacks)."""
    import torch

    keys = source.keys()
    with torch.no_grad():
        for prefix, mod in module.named_modules():
            for name, buf in mod._buffers.items():
                if buf is None or name in mod._non_persistent_buffers_set:
                    continue
                full = f"{prefix}.{name}" if prefix else name
                if full in keys:
                    buf.copy_(source.get((full,), tuple(buf.shape)).to(buf.dtype))


class _Load:
    """A recipe's leaf: the checkpoint tensor stored under ``key``."""

    def __init__(self, key: str) -> None:
        self.key = key


class _Op:
    """A recipe's step: ``func`` over arguments that hold recipes (item ``index`` of a tuple result)."""

    def __init__(self, func: Any, args: Any, index: int | None) -> None:
        self.func, self.args, self.index = func, args, index


def _realize(recipe: Any, read: Callable[[str], Any]) -> Any:
    from torch.utils import _pytree as pytree

    if isinstance(recipe, _Load):
        return read(recipe.key)
    args, kwargs = pytree.tree_map(lambda leaf: _realize(leaf, read) if isinstance(leaf, (_Load, _Op)) else leaf,
                                   recipe.args, is_leaf=lambda leaf: isinstance(leaf, (_Load, _Op)))
    out = recipe.func(*args, **kwargs)
    return out if recipe.index is None else out[recipe.index]


def record_conversion(header: dict[str, Any], convert: Callable[[dict[str, Any]], dict[str, Any]],
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``convert`` (diffusers' single-file converter) over ``header``'s meta tensors and keep,
    for each tensor it returns, the recipe that makes it from the checkpoint's (a rename, a slice,
    a chunk of a fused projection, a transpose): (converted meta tensors, their recipes by key)."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils import _pytree as pytree

    recipes: dict[int, tuple[Any, Any]] = {id(t): (_Load(k), t) for k, t in header.items()}

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            leaves = pytree.tree_leaves((args, kwargs))
            if not any(isinstance(x, torch.Tensor) and id(x) in recipes for x in leaves):
                return out
            tmpl = pytree.tree_map(lambda x: recipes[id(x)][0] if isinstance(x, torch.Tensor) and id(x) in recipes
                                   else x, (args, kwargs))
            if isinstance(out, torch.Tensor):
                recipes[id(out)] = (_Op(func, tmpl, None), out)
            elif isinstance(out, (tuple, list)):
                for i, item in enumerate(out):
                    if isinstance(item, torch.Tensor):
                        recipes[id(item)] = (_Op(func, tmpl, i), item)
            return out

    with Recorder():
        converted = convert(dict(header))
    return converted, {k: recipes[id(v)][0] for k, v in converted.items() if v is not None and id(v) in recipes}


class SingleFileWeights:
    """One component's weights in a single-file (LDM) checkpoint: each tensor read through a memory
    map and converted as diffusers converts it (the recipe :func:`record_conversion` kept)."""

    def __init__(self, path: Path, recipes: dict[str, Any]) -> None:
        self.path = path
        self._recipes = recipes

    def keys(self) -> set[str]:
        return set(self._recipes)

    def describe(self) -> str:
        return f"single-file safetensors ({self.path.name})"

    def get(self, names: tuple[str, ...], shape: tuple[int, ...]) -> Any:
        from safetensors import safe_open

        key = next((n for n in names if n in self._recipes), None)
        if key is None:
            raise SourceError(f"{self.path}: the checkpoint gives no weight {names[0]!r}")
        with safe_open(str(self.path), framework="pt") as f:
            tensor = _realize(self._recipes[key], f.get_tensor).contiguous()
        if tuple(tensor.shape) != tuple(shape):
            raise SourceError(f"{self.path}: {key} converts to shape {tuple(tensor.shape)}, the architecture "
                              f"says {tuple(shape)}")
        return tensor


# --------------------------------------------------------------------------- empty modules


@contextlib.contextmanager
def _meta_parameters() -> Iterator[None]:
    """Parameters registered inside go to the meta device at once (buffers stay real), as
    accelerate's ``init_empty_weights(include_buffers=False)``: the init runs on no storage."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(self: Any, name: str, param: Any) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = dict(param.__dict__)
            self._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            self._parameters[name].__dict__.update(kwargs)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def empty_module(build: Callable[[], Any], mode: Any) -> Any:
    """``build()`` with every parameter a fake CPU tensor of ``mode`` (tied ones stay tied):
    exportable, no weight storage."""
    import torch

    with _meta_parameters():
        module = build()
    fakes: dict[int, Any] = {}
    for mod in module.modules():
        for name, param in list(mod._parameters.items()):
            if param is None:
                continue
            if id(param) not in fakes:
                # fp32, as the in-memory export runs every component (``module.float()``)
                dtype = torch.float32 if param.is_floating_point() else param.dtype
                with mode:
                    fake = torch.empty(tuple(param.shape), dtype=dtype, device="cpu")
                fakes[id(param)] = torch.nn.Parameter(fake, requires_grad=False)
            mod._parameters[name] = fakes[id(param)]
    return module.eval()


def fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class _Weight:
    component: str
    names: tuple[str, ...]  # the state-dict name, then the names tied to it


def _weights_of(wrapper: Any, pipe: Any, sources: dict[str, WeightSource]) -> dict[str, _Weight]:
    """The wrapper's parameter names (the exporter names initializers after them) -> the
    component and state-dict names the sources know them by."""
    by_id: dict[int, _Weight] = {}
    for component in sources:
        module = getattr(pipe, component, None)
        if module is None:
            continue
        canonical = {id(p): n for n, p in module.named_parameters()}
        names: dict[int, list[str]] = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(n)
        for pid, first in canonical.items():
            rest = tuple(n for n in names[pid] if n != first)
            by_id[pid] = _Weight(component, (first, *rest))
    return {n: by_id[id(p)] for n, p in wrapper.named_parameters(remove_duplicate=False) if id(p) in by_id}


def export_streamed(plan: Any, path: Path, opset: int, pipe: Any, sources: dict[str, WeightSource],
                    fmt: Any = None, on_tensor: Callable[[str], None] = lambda name: None) -> dict[str, Any]:
    """Export ``plan`` (whose module has fake weights) to ``path`` with its weights streamed from
    ``sources`` (component name -> source) into ``model.onnx.data``; returns what was streamed.

    ``fmt`` (an int8 or int4 :class:`~enginekit.export.compress.WeightFormat`) compresses the
    MatMul/Gemm weights on the way, each as it is drawn or read (ONNX Runtime's block-wise
    quantizer, the same pass as :func:`~enginekit.export.compress.compress_component`): no float
    copy of the weights is ever written. The record then holds the compression's under
    ``"compression"``."""
    import onnx_ir as ir
    import torch
    from torch._subclasses.fake_tensor import is_fake

    weights = _weights_of(plan.module, pipe, sources)
    program = _trace(plan, opset)
    graph = program.model.graph

    def loader(weight: _Weight, shape: tuple[int, ...], dtype: Any, perm: tuple[int, ...] | None = None,
               ) -> Callable[[], Any]:
        def load() -> Any:
            tensor = sources[weight.component].get(weight.names, shape).to(dtype)
            if perm is not None:
                tensor = tensor.permute(perm)
            return _torch_tensor(tensor.contiguous(), weight.names[0])
        return load

    from onnxscript.optimizer._constant_folding import DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT as fold_limit

    hidden: dict[ir.Value, tuple[_Weight, tuple[int, ...], Any]] = {}
    streamed_bytes = 0
    for name, value in list(graph.initializers.items()):
        raw = getattr(value.const_value, "raw", None)
        if not (isinstance(raw, torch.Tensor) and is_fake(raw)):
            continue
        weight = weights.get(name)
        if weight is None:
            raise ExportError(f"{plan.name}: the exported graph has a weight {name!r} that no component parameter "
                              "matches (a renamed or derived weight the streaming export cannot source)")
        shape, dtype = tuple(raw.shape), raw.dtype
        streamed_bytes += raw.numel() * raw.element_size()
        if raw.numel() <= fold_limit:
            # Small enough for the constant folder to read: loaded now, so it folds as in memory.
            value.const_value = loader(weight, shape, dtype)()
        else:
            value.const_value = None  # hidden from the folder, which would fold it into memory
            hidden[value] = (weight, shape, dtype)
    # The deduplication pass warns once per hidden weight (it cannot compare what it cannot read), and
    # the optimizer's passes log at INFO wherever a library has configured the root logger.
    quiet = {name: logging.getLogger(name) for name in ("onnx_ir", "onnxscript")}
    levels = {name: log.level for name, log in quiet.items()}
    for log in quiet.values():
        log.setLevel(logging.ERROR)
    try:
        program.optimize()
    finally:
        for name, log in quiet.items():
            log.setLevel(levels[name])
    n_transposed = _fold_transposes(graph, hidden, loader)
    for value, (weight, shape, dtype) in hidden.items():
        if value.name in graph.initializers and graph.initializers[value.name] is value:
            value.const_value = ir.LazyTensor(loader(weight, shape, dtype), dtype=_ir_dtype(dtype),
                                              shape=ir.Shape(shape), name=value.name)
    sources_used = sorted({w.component for w in weights.values()})
    record = {"streamed": True, "weights": "; ".join(sources[c].describe() for c in sources_used),
              "streamed_bytes": streamed_bytes, "transposed_on_the_way": n_transposed}
    if fmt is not None and fmt.by_pass:
        from enginekit.export.compress import compress_lazy_model

        return {**record, "compression": compress_lazy_model(program.model, path, fmt, on_tensor)}
    # onnx_ir writes one tensor after another (one worker): each lazy tensor is read, written, dropped.
    ir.save(program.model, str(path), external_data=DATA_FILE, size_threshold_bytes=_INLINE_BYTES, max_workers=1)
    return record


def _trace(plan: Any, opset: int) -> Any:
    """The dynamo exporter's program for ``plan``, unoptimised (the caller optimises it)."""
    import torch

    in_names = [s.name for s in plan.inputs]
    out_names = [s.name for s in plan.outputs]
    dyn: tuple[Any, ...] = tuple({j: d for j, d in enumerate(s.shape) if isinstance(d, str)} for s in plan.inputs)
    # A forward(a, b, *rest) binds the tail as one argument: its dynamic shapes go in one tuple.
    params = list(inspect.signature(plan.module.forward).parameters.values())
    star = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if star is not None and len(dyn) > star:  # (an empty tail is no argument at all)
        dyn = (*dyn[:star], tuple(dyn[star:]))
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(plan.module, plan.example, None, input_names=in_names, output_names=out_names,
                                     opset_version=opset, dynamo=True, dynamic_shapes=dyn, optimize=False,
                                     verbose=False)
    except Exception as exc:
        raise ExportError(f"torch.onnx.export of {plan.name} with streamed weights failed: {one_line(exc)}") from exc


def _fold_transposes(graph: Any, hidden: dict[Any, Any], loader: Callable[..., Callable[[], Any]]) -> int:
    """Fold each ``Transpose`` of a hidden weight it alone uses into an initializer transposed as it
    is streamed (the constant folder folds these whatever their size, in the in-memory export)."""
    import onnx_ir as ir

    folded = 0
    outputs = set(graph.outputs)
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        src, out = node.inputs[0], node.outputs[0]
        if src not in hidden or len(src.uses()) != 1 or out in outputs or src in outputs:
            continue
        weight, shape, dtype = hidden.pop(src)
        perm_attr = node.attributes.get("perm")
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(len(shape))))
        new_shape = tuple(shape[i] for i in perm)
        name = out.name
        new = ir.Value(name=name, shape=ir.Shape(new_shape), type=ir.TensorType(_ir_dtype(dtype)),
                       const_value=ir.LazyTensor(loader(weight, shape, dtype, perm), dtype=_ir_dtype(dtype),
                                                 shape=ir.Shape(new_shape), name=name))
        ir.convenience.replace_all_uses_with(out, new)
        graph.remove(node, safe=True)
        del graph.initializers[src.name]
        graph.register_initializer(new)
        folded += 1
    return folded


def _ir_dtype(dtype: Any) -> Any:
    from torch.onnx._internal.exporter._core import torch_dtype_to_onnx_dtype

    return torch_dtype_to_onnx_dtype(dtype)


def _torch_tensor(tensor: Any, name: str) -> Any:
    """An ``onnx_ir`` tensor over a torch tensor (bf16 included), as the exporter makes them."""
    from torch.onnx._internal.exporter._core import TorchTensor

    return TorchTensor(tensor, name)
