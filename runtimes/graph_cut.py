"""Part of an engine as an engine of its own: a graph cut where one of its outputs is fed back in.

A cut keeps ``outputs`` and turns ``inputs`` (tensors the full graph gives out) into inputs:
every node that only fed them goes, and so do the weights only those nodes read. DeepCache's
shallow UNet is the UNet cut at its ``deep_cache`` output (:mod:`enginekit.export.diffusion.deepcache`):
cut from the very engine that runs the full step, it has the same weights, precision, static
shapes and quantization, whatever stages made that engine. The original inputs all stay
(those the cut no longer reads are simply unused), so the same feeds run either graph.

Each backend cuts its own format: ONNX Runtime an ONNX graph (the kept weights read into the
model: a shallow cut keeps few), OpenVINO its ``ov.Model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enginekit.errors import BackendError, need

_PURPOSE = "Step caching (cutting the denoiser's graph) on an ONNX Runtime engine"

__all__ = ["Cut", "cut_onnx", "cut_openvino"]


@dataclass(frozen=True)
class Cut:
    """Which outputs to keep and which of the graph's outputs become inputs."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    #: How the runner is known beside its component ("deepcache"): ``unet#deepcache``.
    label: str

    def key(self, component: str) -> str:
        return f"{component}#{self.label}"

    def apply_onnx(self, path: Path) -> Any:
        return cut_onnx(path, self)

    def apply_openvino(self, model: Any, where: str) -> Any:
        return cut_openvino(model, self, where)


def _check(have_outputs: list[str], cut: Cut, where: str) -> None:
    missing = [n for n in (*cut.inputs, *cut.outputs) if n not in have_outputs]
    if missing:
        raise BackendError(f"{where} has no output {missing[0]!r} to cut at (outputs: {', '.join(have_outputs)}); "
                           "export the model again with this enginekit")


def _subgraph_reads(node: Any) -> set[str]:
    """Names a node's subgraphs (If/Loop bodies) read from the enclosing graph."""
    onnx = need("onnx", _PURPOSE, "onnx")

    reads: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            made = {i.name for i in g.input} | {i.name for i in g.initializer}
            for inner in g.node:
                made |= set(inner.output)
            for inner in g.node:
                reads |= {n for n in (*inner.input, *_subgraph_reads(inner)) if n and n not in made}
    return reads


def cut_onnx(path: Path, cut: Cut) -> Any:
    """The ONNX model at ``path`` cut by ``cut``, with the weights it keeps read in (from the
    model's external data file when it has one), ready for ``InferenceSession(model bytes)``."""
    onnx = need("onnx", _PURPOSE, "onnx")
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    _check([o.name for o in g.output], cut, str(path))
    producer = {out: node for node in g.node for out in node.output}
    stop = set(cut.inputs) | {i.name for i in g.input}
    keep: set[int] = set()
    todo, seen = list(cut.outputs), set()
    while todo:
        name = todo.pop()
        if name in seen or name in stop:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        todo.extend(n for n in (*node.input, *_subgraph_reads(node)) if n)
    nodes = [n for n in g.node if id(n) in keep]
    inits = [t for t in g.initializer if t.name in seen]
    for tensor in inits:
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    outputs = {o.name: o for o in g.output}
    graph = onnx.helper.make_graph(
        nodes, f"{g.name}_{cut.label}",
        list(g.input) + [outputs[n] for n in cut.inputs],
        [outputs[n] for n in cut.outputs], inits,
        value_info=[v for v in g.value_info if v.name in seen])
    made = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    made.functions.extend(model.functions)
    return made


def cut_openvino(model: Any, cut: Cut, where: str) -> Any:
    """``model`` (an ``ov.Model``, changed in place: read it for this) cut by ``cut``."""
    import openvino as ov

    _check([name for o in model.outputs for name in o.get_names()], cut, where)
    params = list(model.get_parameters())
    for name in cut.inputs:
        result = model.output(name).get_node()
        source = result.input_value(0)
        param = ov.opset13.parameter(source.get_partial_shape(), source.get_element_type(), name=name)
        param.output(0).get_tensor().set_names({name})
        source.get_tensor().set_names(set())
        for target in list(source.get_target_inputs()):
            if target.get_node() is not result:
                target.replace_source_output(param.output(0))
        params.append(param)
    results = [model.output(name).get_node() for name in cut.outputs]
    return ov.Model(results, params, f"{model.get_friendly_name()}_{cut.label}")
