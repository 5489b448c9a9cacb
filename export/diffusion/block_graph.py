"""The ONNX side of the per-block check (:mod:`~enginekit.export.diffusion.block_parity`): where each
module's nodes are in an exported graph, and the graph run one block's stage at a time.

The dynamo exporter tags every node with the module scopes it was traced in
(``pkg.torch.onnx.name_scopes``); the optimiser keeps them. Nodes a later pass makes (a quantizer's
``MatMulNBits``) carry none: they belong to the blocks all their tagged neighbours belong to.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["block_values", "elem_types", "run_staged", "run_with_outputs", "weight_format"]

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_FLOAT_TYPES = (1, 10, 16)  # onnx FLOAT, FLOAT16, BFLOAT16
_DICT_ACCESS = re.compile(r"""\.?__dict__\[['"]_modules['"]\]\[['"]([^'"]+)['"]\]""")
_INDEX = re.compile(r"\[(\d+)\]")


def _scopes(node: Any) -> list[str] | None:
    """The module scopes the exporter tagged ``node`` with (None: untagged, a node a later pass made)."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            try:
                scopes = list(ast.literal_eval(prop.value))[:-1]  # the last is the fx node, not a module
            except (ValueError, SyntaxError):
                return None
            return [_module_path(s) for s in scopes]
    return None


def _module_path(scope: str) -> str:
    """A scope as ``named_modules`` names it: a module reached through ``__dict__['_modules']['x']``
    (diffusers' UNet does so) or an index ``[0]`` is written ``.x`` and ``.0``."""
    scope = _DICT_ACCESS.sub(r".\1", scope)
    return _INDEX.sub(r".\1", scope).lstrip(".")


def _nodes(graph: Any) -> Iterator[Any]:
    """The graph's nodes and those of its subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _nodes(attr.g)
            for g in attr.graphs:
                yield from _nodes(g)


def elem_types(model: Any) -> dict[str, int]:
    """Each value's ONNX element type, from the graph's value infos (inferred where they lack one)."""
    import onnx

    def read(m: Any) -> dict[str, int]:
        g = m.graph
        return {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.output, *g.input)
                if v.type.tensor_type.elem_type}

    types = read(model)
    made = {o for node in model.graph.node for o in node.output if o}
    if made - types.keys():
        try:  # (the graph only: initializers carry their types without their data)
            types = {**read(onnx.shape_inference.infer_shapes(model)), **types}
        except Exception:  # a contrib op's schema it lacks: the values without a type are left out
            pass
    return types


def _membership(nodes: list[Any], wanted: set[str]) -> tuple[list[set[str]], dict[str, list[int]]]:
    """The blocks each node belongs to, and each value's readers (node indices)."""
    tags = [_scopes(n) for n in nodes]
    member: list[set[str] | None] = [wanted.intersection(t) if t is not None else None for t in tags]
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for inp in _inputs(n):
            readers.setdefault(inp, []).append(i)
    for i, n in enumerate(nodes):
        if member[i] is None:
            near = [producer[v] for v in n.input if v in producer] + [j for o in n.output for j in readers.get(o, [])]
            known = [member[j] for j in near if member[j] is not None]
            member[i] = set.intersection(*known) if known else set()
    return member, readers  # type: ignore[return-value]


def _inputs(node: Any) -> list[str]:
    """What ``node`` reads: its inputs and the outer values its subgraphs read."""
    out = [v for v in node.input if v]
    for attr in node.attribute:
        for g in ([attr.g] if attr.g.node else []) + list(attr.graphs):
            made = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            out += [v for n in g.node for v in _inputs(n) if v not in made]
    return out


def block_values(model: Any, names: list[str], types: dict[str, int]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Per block, the float values its nodes make that the rest of the graph reads; and, for the
    blocks without any, why. A node without the exporter's tag (a quantizer's ``MatMulNBits``)
    belongs to the blocks all its tagged neighbours (producers and readers) belong to."""
    nodes = list(_nodes(model.graph))
    member, readers = _membership(nodes, set(names))
    graph_outputs = {o.name for o in model.graph.output}
    values: dict[str, list[str]] = {n: [] for n in names}
    for i, n in enumerate(nodes):
        for out in n.output:
            if not out or types.get(out) not in _FLOAT_TYPES:
                continue
            for block in member[i] or ():
                if out in graph_outputs or any(block not in (member[j] or ()) for j in readers.get(out, [])):
                    values[block].append(out)
    tagged = set().union(*(m for m in member if m))
    why = {}
    for name in names:
        if name not in tagged:
            why[name] = "no node of the graph carries this module's scope"
        elif not values[name]:
            why[name] = "none of its nodes' float values is read outside it"
    return values, why


def run_with_outputs(onnx_path: Path, extra: list[str], types: dict[str, int],
                      feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``onnx_path`` with ``extra`` values as outputs too, through a copy of its graph written
    beside it (so its external data resolves), deleted after."""
    import onnx

    from enginekit.runtimes.onnxruntime import run_onnx_file

    model = onnx.load(str(onnx_path), load_external_data=False)
    have = {o.name for o in model.graph.output}
    for name in extra:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
            have.add(name)
    tmp = onnx_path.with_name(f".{onnx_path.stem}.block-check.onnx")
    try:
        onnx.save_model(model, str(tmp))
        del model
        return run_onnx_file(tmp, feeds)
    finally:
        tmp.unlink(missing_ok=True)


def run_staged(onnx_path: Path, order: list[str], extra: list[str], types: dict[str, int],
                feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``onnx_path`` one stage at a time, a stage the nodes up to the end of one block (in the
    order the blocks ran), each through its own ONNX Runtime session over a graph written beside the
    model (so only that stage's weights are read); returns the graph outputs and ``extra`` values."""
    import onnx

    from enginekit.runtimes.onnxruntime import run_onnx_file

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    nodes = list(graph.node)
    member, _ = _membership(nodes, set(order))
    rank = {name: i for i, name in enumerate(order)}
    producer_stage: dict[str, int] = {}
    stages: list[list[Any]] = [[] for _ in order] or [[]]
    for node, blocks in zip(nodes, member):
        stage = max([producer_stage.get(v, 0) for v in _inputs(node)] + [rank[b] for b in blocks] + [0])
        stages[stage].append(node)
        producer_stage.update((o, stage) for o in node.output if o)
    inits = {t.name: t for t in graph.initializer}
    finals = [o.name for o in graph.output]
    keep = set(finals) | set(extra)
    last_use: dict[str, int] = {}
    for i, stage_nodes in enumerate(stages):
        for node in stage_nodes:
            for v in _inputs(node):
                last_use[v] = i
    env = dict(feeds)
    tmp = onnx_path.with_name(f".{onnx_path.stem}.block-check.onnx")
    try:
        for i, stage_nodes in enumerate(stages):
            if not stage_nodes:
                continue
            made = {o for n in stage_nodes for o in n.output if o}
            reads = list(dict.fromkeys(v for n in stage_nodes for v in _inputs(n) if v not in made))
            ins = [v for v in reads if v not in inits]
            outs = [v for v in made if v in keep or last_use.get(v, -1) > i]
            stage_graph = onnx.helper.make_graph(
                stage_nodes, f"{graph.name}-stage{i}",
                [onnx.helper.make_tensor_value_info(v, onnx.helper.np_dtype_to_tensor_dtype(env[v].dtype),
                                                    env[v].shape) for v in ins],  # (the values it is run on)
                [onnx.helper.make_tensor_value_info(v, types.get(v, onnx.TensorProto.FLOAT), None) for v in outs],
                initializer=[inits[v] for v in reads if v in inits])
            stage_model = onnx.helper.make_model(stage_graph, opset_imports=model.opset_import,
                                                 ir_version=model.ir_version)
            stage_model.functions.extend(model.functions)
            onnx.save_model(stage_model, str(tmp))
            del stage_model, stage_graph
            env.update(run_onnx_file(tmp, {v: env[v] for v in ins}))
            for v in [v for v in env if v not in keep and last_use.get(v, -1) <= i]:
                del env[v]
    finally:
        tmp.unlink(missing_ok=True)
    return {v: env[v] for v in keep if v in env}


def weight_format(model: Any) -> str:
    """The weights' format in an ONNX graph: int4 or int8 (``MatMulNBits`` by its ``bits``, or a
    ``DequantizeLinear`` of 4/8-bit data), fp16/bf16 (half-precision float initializers), else fp32."""
    bits = set()
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits |= {a.i for a in node.attribute if a.name == "bits"} or {4}
        elif node.op_type == "DequantizeLinear" and node.input and node.input[0] in inits:
            t = inits[node.input[0]]
            bits.add(4 if t in (21, 22) else 8 if t in (2, 3) else 0)
    if 4 in bits:
        return "int4"
    if 8 in bits:
        return "int8"
    halves = {t for t in inits.values() if t in (10, 16)}
    if halves:
        return "bf16" if 16 in halves else "fp16"
    return "fp32"
