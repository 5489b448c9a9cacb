"""Where each LoRA-patchable weight lives in an exported or compiled graph (torch-free).

The exporters name weights however they like: the dynamo exporter folds a Linear's transpose
into an anonymous ``val_NNN`` initializer, TorchScript's writes ``onnx::MatMul_NNN``, OpenVINO
renames its Constants (``Transpose_2529``) and compresses them to fp16. So the export records,
per component, a map from each diffusers module name (``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q``) to the tensor that holds its weight, found by value: the
initializer whose bytes equal the module's weight, or its transpose. The map is the artifact's
``lora_map.json`` asset (hashed like the others); each compile finds the same tensors again in
the engine it writes (:func:`relink`), so a compiled artifact's map names its own tensors.

An entry: ``{"tensor": NAME, "transposed": bool, "shape": [...]}`` where ``shape`` is the
module weight's own (torch) shape, ``(out, in)`` or ``(out, in, kh, kw)``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from enginekit.errors import ArtifactError, need

__all__ = ["MAP_FILE", "MAP_VERSION", "digest", "onnx_tensors", "ir_tensors", "engine_tensors", "match_weights",
           "read_map", "relink", "to_graph_layout"]

MAP_FILE = "lora_map.json"
MAP_VERSION = 1
_FLOATS = (np.float32, np.float16, np.float64)


def digest(array: np.ndarray) -> str:
    """A value fingerprint: dtype, shape and a hash of the C-ordered bytes."""
    a = np.ascontiguousarray(array)
    return f"{a.dtype.str}{a.shape}:{hashlib.blake2b(memoryview(a).cast('B'), digest_size=16).hexdigest()}"


def onnx_tensors(path: Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """An ONNX file's float initializers of rank >= 2 (``names``: only those), external data
    memory-mapped rather than read."""
    onnx = need("onnx", "Run-time LoRA on an ONNX Runtime engine", "onnx")
    from onnx import numpy_helper
    from onnx.helper import tensor_dtype_to_np_dtype

    wanted = set(names) if names is not None else None
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if len(t.dims) < 2 or (wanted is not None and t.name not in wanted):
            continue
        dtype = np.dtype(tensor_dtype_to_np_dtype(t.data_type))
        if dtype.type not in _FLOATS:
            if wanted is not None:
                yield t.name, np.zeros(tuple(t.dims), dtype)  # a quantized weight: the caller refuses it
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            offset = int(info.get("offset", 0))
            yield t.name, np.memmap(Path(path).parent / info["location"], dtype=dtype, mode="r", offset=offset,
                                    shape=tuple(t.dims))
        else:
            yield t.name, numpy_helper.to_array(t)


def ir_tensors(path: Path, names: Iterable[str] | None = None, model: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """An OpenVINO model's float Constants of rank >= 2 by friendly name (``model``: already read).
    A weight NNCF compressed (int8/int4) is given as the float32 weight it decompresses to, under
    its integer Constant's name (which NNCF keeps from the float model)."""
    from enginekit.runtimes.openvino_lora import decompressed, decompression_end

    if model is None:
        import openvino as ov

        model = ov.Core().read_model(str(path))
    wanted = set(names) if names is not None else None
    compressed: dict[str, Any] = {}
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        name = op.get_friendly_name()
        if wanted is not None and name not in wanted:
            continue
        end = decompression_end(op)
        if end is not None and len(end.get_output_shape(0)) >= 2:
            compressed[name] = end
            continue
        if len(op.get_output_shape(0)) < 2:
            continue
        data = op.get_data()
        if data.dtype.type in _FLOATS:
            yield name, data
        elif wanted is not None:
            yield name, np.zeros(data.shape, data.dtype)
    yield from decompressed(compressed)


def engine_tensors(path: Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """The float weights of an engine file, by what its suffix says it is (ONNX or OpenVINO IR)."""
    return ir_tensors(path, names) if Path(path).suffix == ".xml" else onnx_tensors(path, names)


def _index(tensors: Iterable[tuple[str, np.ndarray]], prefixes: dict[str, Any] | None = None,
           ) -> tuple[dict[str, list[str]], set[np.dtype]]:
    """Each tensor's :func:`digest`, and (``prefixes``) its shape and first values for :func:`_near`:
    nothing else of a tensor is kept, so the tensors can stream by."""
    index: dict[str, list[str]] = {}
    dtypes: set[np.dtype] = set()
    for name, value in tensors:
        index.setdefault(digest(value), []).append(name)
        dtypes.add(value.dtype)
        if prefixes is not None:
            prefixes[name] = (tuple(value.shape), np.array(np.asarray(value).reshape(-1)[:_PREFIX], np.float32))
    return index, dtypes


def match_weights(weights: Mapping[str, np.ndarray], tensors: Iterable[tuple[str, np.ndarray]],
                  near: bool = False) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Find each module weight (torch layout, by module name) among ``tensors``: as it is, transposed
    (a 2-D weight, or a 1x1 convolution's as a matrix) or flattened, in any float dtype the graph
    holds. With ``near``, a weight found nowhere exactly is then looked for among the tensors of its
    shape by value (:func:`_near`): a quantized engine's weights, decompressed, are the float ones
    give or take the rounding. Returns the entries found and the module names not found (or found
    more than once)."""
    prefixes: dict[str, np.ndarray] | None = {} if near else None
    index, dtypes = _index(tensors, prefixes)
    found: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for module, w in weights.items():
        w = np.asarray(w)
        mat = w.reshape(w.shape[0], -1)
        hits: list[tuple[str, bool]] = []
        for dtype in dtypes:
            for cand, transposed in ((w, False), (mat, False), (mat.T, True)):
                for name in index.get(digest(cand.astype(dtype)), ()):
                    if (name, transposed) not in hits:
                        hits.append((name, transposed))
        if len({h[0] for h in hits}) == 1:
            found[module] = {"tensor": hits[0][0], "transposed": hits[0][1], "shape": list(w.shape)}
        else:
            missing.append(module)
    if prefixes and missing:
        taken = {e["tensor"] for e in found.values()}
        close = _near({m: np.asarray(weights[m]) for m in missing},
                      {n: p for n, p in prefixes.items() if n not in taken})
        found.update(close)
        missing = [m for m in missing if m not in close]
    return found, missing


#: The largest relative error (``|t - w| / |w|``) a decompressed weight may have and still be ``w``:
#: int4 with groups of 128 is about 0.1 off, an unrelated weight of the same shape about 1.4.
_NEAR = 0.3
#: How many leading values of a tensor judge whether it is a weight, rounded.
_PREFIX = 4096


def _near(weights: Mapping[str, np.ndarray], prefixes: Mapping[str, tuple[tuple[int, ...], np.ndarray]],
          ) -> dict[str, dict[str, Any]]:
    """Each weight's closest tensor of the same size in some layout, judged on the first ``_PREFIX``
    values (enough to tell a weight's rounded self, ~0.1 off, from another weight, ~1.4 off), when
    within ``_NEAR`` and no other weight claims it: candidates are told apart by error, not order."""
    by_size: dict[int, list[tuple[str, tuple[int, ...], np.ndarray]]] = {}
    for name, (shape, head) in prefixes.items():
        by_size.setdefault(int(np.prod(shape)), []).append((name, shape, head))
    claims: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for module, w in weights.items():
        mat = w.reshape(w.shape[0], -1)
        layouts = [(False, mat)] + ([(True, mat.T)] if mat.shape[0] > 1 and mat.shape[1] > 1 else [])
        ranked = []
        for transposed, cand in layouts:
            rows = -(-_PREFIX // cand.shape[1])
            flat = np.asarray(cand[:rows], np.float32).reshape(-1)[:_PREFIX]
            norm = float(np.linalg.norm(flat)) or 1.0
            for name, shape, head in by_size.get(int(w.size), []):
                fits = shape == cand.shape if len(shape) == 2 else not transposed and shape == w.shape
                if fits:
                    ranked.append((float(np.linalg.norm(head - flat)) / norm, name, transposed))
        if ranked and min(ranked)[0] <= _NEAR:
            _, name, transposed = min(ranked)
            claims.setdefault(name, []).append((module, {"tensor": name, "transposed": transposed,
                                                         "shape": list(w.shape)}))
    return {module: entry for found in claims.values() if len(found) == 1 for module, entry in found}


def to_graph_layout(delta: np.ndarray, entry: Mapping[str, Any], graph_shape: tuple[int, ...]) -> np.ndarray:
    """A weight update in the module's (torch) layout, laid out as the graph's tensor is."""
    mat = delta.reshape(delta.shape[0], -1)
    return np.ascontiguousarray((mat.T if entry["transposed"] else mat).reshape(graph_shape))


def read_map(root: Path, manifest: Any) -> dict[str, Any] | None:
    """The artifact's map (None: an artifact exported before run-time LoRA, or without the map)."""
    if not any(a.path == MAP_FILE for a in manifest.assets):
        return None
    try:
        data = json.loads((Path(root) / MAP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{root}: {MAP_FILE} is unreadable ({exc})") from exc
    if not isinstance(data, dict) or data.get("version") != MAP_VERSION:
        raise ArtifactError(f"{root}: {MAP_FILE} has version {data.get('version') if isinstance(data, dict) else '?'}, "
                            f"this enginekit reads {MAP_VERSION}; export the model again")
    return data


def relink(source_root: Path, source: Any, out_root: Path, compiled: Any) -> Any:
    """Find the map's tensors in a freshly compiled engine (names and layouts change on the way:
    ONNX Runtime's optimizer folds transposes, OpenVINO renames and compresses Constants) and
    rewrite the map in ``out_root``; returns ``compiled`` with the map's asset hash updated.
    A weight quantized on the way is found by value (:func:`_near`) where the engine keeps it
    decompressible (OpenVINO's int8/int4); one the compile turned into something else (ONNX
    Runtime's integer initializers, a fused tensor) drops out of the map, and ``left_out`` counts
    them per component so a LoRA for them is refused with the reason."""
    from enginekit.artifact import file_entry

    data = read_map(source_root, source)
    if data is None or MAP_FILE not in {a.path for a in compiled.assets}:
        return compiled
    components: dict[str, Any] = {}
    left_out: dict[str, int] = {}
    for comp_name, entries in data.get("components", {}).items():
        if comp_name not in compiled.components or comp_name not in source.components:
            continue
        src_entry = Path(source_root) / source.component(comp_name).entry
        values = dict(engine_tensors(src_entry, {e["tensor"] for e in entries.values()}))
        weights = {}
        for module, e in entries.items():
            v = values.get(e["tensor"])
            if v is not None and v.dtype.type in _FLOATS:
                mat = np.asarray(v).reshape(v.shape[0], -1) if not e["transposed"] else np.asarray(v).reshape(-1, e["shape"][0]).T
                weights[module] = mat.reshape(e["shape"])
        found, _ = match_weights(weights, engine_tensors(Path(out_root) / compiled.component(comp_name).entry),
                                 near=True)
        components[comp_name] = found
        if len(found) < len(entries):
            left_out[comp_name] = len(entries) - len(found)
        del values, weights
    data = {**{k: v for k, v in data.items() if k != "left_out"}, "components": components,
            **({"left_out": left_out} if left_out else {})}
    (Path(out_root) / MAP_FILE).write_text(json.dumps(data, sort_keys=True) + "\n", encoding="utf-8")
    assets = tuple(file_entry(Path(out_root), MAP_FILE) if a.path == MAP_FILE else a for a in compiled.assets)
    return compiled.replace(assets=assets)
