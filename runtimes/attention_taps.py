"""An engine's attention probabilities as extra outputs of the same graph: what explanations read.

A ViT's attention probabilities (softmax(QK^T/sqrt(d)) per layer) are intermediate tensors of
its engine, never outputs: the plain engine stays as the export and compile stages made it, so
that OpenVINO keeps fusing its attention (ScaledDotProductAttention) and ONNX Runtime keeps its
kernels. :class:`AttentionTap` opens a *second* graph of the same engine file, only when an
explanation asks for one, with every attention's probabilities added as outputs
``attention.0`` ... ``attention.{L-1}`` (float32, (N, heads, T, T), in layer order):

- ONNX (exported or ONNX Runtime-compiled): each ``Softmax`` output, through an ``Identity``
  and a ``Cast`` to float32, becomes a graph output.
- OpenVINO IR: the converter fuses each attention into one ``ScaledDotProductAttention``; the
  tap writes that operator out as its definition (``softmax(Q K^T * scale + mask) V``) so the
  probabilities exist, and makes them results. A ``Softmax`` the IR still holds is read as is.

Nothing is written to the artifact: the derived graph lives in memory beside the plain one
(loaded through :meth:`Backend.load_cut`, as a graph cut is), built from the very file the
manifest's hash covers, so a quantized or fp16 engine explains with its own numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enginekit.errors import BackendError, need

__all__ = ["ATTENTION_OUTPUT", "ATTENTION_TAP", "AttentionTap", "attention_outputs"]

#: The tapped outputs' name prefix: ``attention.0`` is the first layer's probabilities.
ATTENTION_OUTPUT = "attention."
_FUSED_ORT = {"Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention"}
_NO_ATTENTION_FIX = "explain with method='occlusion', which runs the plain engine"


def attention_outputs(names: Any) -> list[str]:
    """The tapped output names among ``names``, in layer order."""
    found = [n for n in names if n.startswith(ATTENTION_OUTPUT) and n[len(ATTENTION_OUTPUT):].isdigit()]
    return sorted(found, key=lambda n: int(n[len(ATTENTION_OUTPUT):]))


@dataclass(frozen=True)
class AttentionTap:
    """The component's graph with its attention probabilities as extra outputs (see the module)."""

    label: str = "attention"

    def key(self, component: str) -> str:
        return f"{component}#{self.label}"

    def apply_onnx(self, path: Path) -> Any:
        """The ONNX model at ``path`` with the taps added; its weights stay where they are (an
        external data file is read from the model's folder by the session)."""
        onnx = need("onnx", "Explanations (attention rollout) on an ONNX Runtime engine", "onnx")

        model = onnx.load(str(path), load_external_data=False)
        graph = model.graph
        softmaxes = [n for n in graph.node if n.op_type == "Softmax" and n.domain in ("", "ai.onnx")]
        if not softmaxes:
            fused = sorted({n.op_type for n in graph.node if n.op_type in _FUSED_ORT})
            why = (f"its attention is fused into ONNX Runtime's {fused[0]} operator (compiled with transformer "
                   "fusions; compile without them to explain)" if fused else "it holds no Softmax")
            raise BackendError(f"{path}: no attention probabilities to read: {why}; {_NO_ATTENTION_FIX}")
        for i, node in enumerate(softmaxes):
            name = f"{ATTENTION_OUTPUT}{i}"
            graph.node.append(onnx.helper.make_node("Identity", [node.output[0]], [f"{name}.tap"], name=f"{name}.tap"))
            graph.node.append(onnx.helper.make_node("Cast", [f"{name}.tap"], [name], name=f"{name}.cast",
                                                    to=onnx.TensorProto.FLOAT))
            graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        return model

    def apply_openvino(self, model: Any, where: str) -> Any:
        """``model`` (an ``ov.Model``, changed in place) with the taps added as results."""
        import openvino as ov
        from openvino import opset13 as ops

        probs = []
        for op in model.get_ordered_ops():
            kind = op.get_type_name()
            if kind == "ScaledDotProductAttention":
                probs.append(_unfuse_sdpa(op, ops, where))
            elif kind in ("Softmax", "SoftMax"):
                probs.append(op.output(0))
        if not probs:
            raise BackendError(f"{where}: no attention probabilities to read (no attention operator or Softmax "
                               f"in the model); {_NO_ATTENTION_FIX}")
        results = []
        for i, value in enumerate(probs):
            if value.get_element_type() != ov.Type.f32:
                value = ops.convert(value, ov.Type.f32).output(0)
            result = ops.result(value)
            result.output(0).get_tensor().set_names({f"{ATTENTION_OUTPUT}{i}"})
            results.append(result)
        model.add_results(results)
        return model


def _unfuse_sdpa(op: Any, ops: Any, where: str) -> Any:
    """Replace one ``ScaledDotProductAttention`` by its definition; return its probabilities.

    OpenVINO's operator: ``softmax(Q K^T * scale + mask) V`` with inputs (Q, K, V[, mask[, scale]]),
    scale 1/sqrt(head size) when absent, a boolean mask keeping where True."""
    import numpy as np

    n_inputs = op.get_input_size()
    if op.get_attributes().get("causal") or n_inputs > 5:
        raise BackendError(f"{where}: an attention operator this tap does not read (causal, or more than "
                           f"Q, K, V, mask and scale); {_NO_ATTENTION_FIX}")
    q, k, v = (op.input_value(i) for i in range(3))
    scores = ops.matmul(q, k, False, True)
    if n_inputs > 4:
        scale = op.input_value(4)
    else:
        size = q.get_partial_shape()[-1]
        if not size.is_static:
            raise BackendError(f"{where}: an attention operator with no scale and a dynamic head size; "
                               f"{_NO_ATTENTION_FIX}")
        scale = ops.constant(np.float32(1.0 / math.sqrt(size.get_length()))).output(0)
    if scale.get_element_type() != scores.get_element_type():
        scale = ops.convert_like(scale, scores).output(0)
    scores = ops.multiply(scores, scale)
    if n_inputs > 3:
        mask = op.input_value(3)
        if mask.get_element_type().is_real():
            scores = ops.add(scores, ops.convert_like(mask, scores))
        else:  # boolean: True keeps
            low = ops.constant(np.float32(-np.inf))
            scores = ops.select(mask, scores, ops.convert_like(low, scores))
    probs = ops.softmax(scores, -1)
    op.output(0).replace(ops.matmul(probs, v, False, False).output(0))
    return probs.output(0)


#: The tap explanations open (one per component, kept beside the plain runner).
ATTENTION_TAP = AttentionTap()
