"""Which layers OpenVINO's int8 hurts most: each quantized op gets a float twin in
the same graph, and one pass over held-out inputs scores the error each op adds
(the ranking the auto-fallback keeps in float)."""

from __future__ import annotations

from typing import Any

import numpy as np

from enginekit.errors import QuantizationError, one_line
from enginekit.quant.base import QuantJob
from enginekit.quant.openvino_nncf import (
    feed_dicts,
    image_batch,
    openvino_module,
    quantize_hybrid,
    quantize_int8,
    quiet_nncf,
    read_model,
)

#: Ops that only move or reshape data: quantization noise passes through them
#: unchanged, so ``sensitivity`` charges it to the first real op downstream.
DATA_MOVEMENT = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "VariadicSplit", "Gather",
    "StridedSlice", "Slice", "Broadcast", "Tile", "Convert", "DepthToSpace", "SpaceToDepth",
})
#: Ops whose output does not depend on input values.
NO_VALUE = frozenset({"ShapeOf", "FakeQuantize", "Result", "Parameter", "Constant"})


def _float_twin(out: Any, factories: dict[str, Any], memo: dict[int, Any]) -> Any:
    """The float value of ``out``: FakeQuantize bypassed, and data movement
    downstream of one redone on the bypassed value. None if ``out`` carries no
    quantization noise."""
    node = out.get_node()
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return node.input_value(0)
    if kind not in DATA_MOVEMENT:
        return None
    key = node.get_instance_id()
    if key not in memo:
        memo[key] = _clone_on_twins(node, factories, memo)
    clone = memo[key]
    return None if clone is None else clone.output(out.get_index())


def _clone_on_twins(node: Any, factories: dict[str, Any], memo: dict[int, Any]) -> Any:
    """A copy of ``node`` reading the float twins of its inputs; None when no input has one."""
    from openvino.utils.node_factory import NodeFactory

    inputs = list(node.input_values())
    twins = [_float_twin(v, factories, memo) for v in inputs]
    if all(t is None for t in twins):
        return None
    version = node.get_type_info().version_id
    if version not in factories:
        factories[version] = NodeFactory(version)
    args = [t if t is not None else v for t, v in zip(twins, inputs)]
    return factories[version].create(node.get_type_name(), args, node.get_attributes())


def _probes(model: Any) -> list[tuple[str, Any, Any]]:
    """(op name, quantized output, float output of the same op on unquantized inputs) per quantized op."""
    factories: dict[str, Any] = {}
    memo: dict[int, Any] = {}
    probes = []
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind in NO_VALUE or kind in DATA_MOVEMENT or node.get_output_size() == 0:
            continue
        if not node.get_output_element_type(0).is_real():
            continue
        try:
            twin = _clone_on_twins(node, factories, memo)
        except Exception:  # an op NodeFactory cannot rebuild (internal opsets): not rankable
            continue
        if twin is not None:
            probes.append((node.get_friendly_name(), node.output(0), twin.output(0)))
    return probes


def sensitivity(job: QuantJob, eval_inputs: Any, hybrid: bool = False) -> list[tuple[str, float]]:
    """Rank the ops int8-static quantizes by the error quantization adds to each, worst first.

    One quantization (``job``'s calibration and options, as ``int8_static``)
    and one pass over ``eval_inputs``: every quantized op (MatMul,
    Convolution, ScaledDotProductAttention, ...) gets a float twin in the same
    graph that reads the *unquantized* values of its inputs (FakeQuantize
    bypassed, weights included). Its score is the relative squared error
    sum((y_int8 - y_float)^2) / sum(y_float^2) of its output over the inputs:
    the error the op itself adds, given what reaches it, not the error
    accumulated upstream (that would rank layers by depth). Names are
    OpenVINO op names, ready for ``QuantOptions.exclude_nodes``.
    """
    method = "sensitivity"
    feeds = feed_dicts(job.calibration, method)
    images = feeds if feeds is not None else image_batch(job.calibration, method, "calibration")
    dicts = feed_dicts(eval_inputs, method)
    inputs: Any = dicts if dicts is not None else image_batch(eval_inputs, method, "eval_inputs")
    with quiet_nncf() as nncf:
        model = read_model(job, method)
        if hybrid:  # the denoiser's hybrid recipe; ``exclude_nodes`` go to its quantize pass
            if feeds is None:
                raise QuantizationError(f"{method}: hybrid ranking needs feed dicts as calibration")
            quantized, _ = quantize_hybrid(nncf, model, job, feeds, method, fold_weights=False)
        else:
            quantized, _ = quantize_int8(nncf, model, job, images, method, fold_weights=False)
        ov = openvino_module()
        probes = _probes(quantized)
        if not probes:
            return []
        outputs = [p for _, q, f in probes for p in (q, f)]
        try:
            probe_model = ov.Model(outputs, quantized.get_parameters(), "sensitivity")
            # f32: the twins are the float reference, and must not run in bf16 on AMX CPUs.
            compiled = ov.Core().compile_model(probe_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            request = compiled.create_infer_request()
        except Exception as exc:
            raise QuantizationError(f"{method}: could not compile the probe model: {one_line(exc)}") from exc
        err = np.zeros(len(probes))
        ref = np.zeros(len(probes))
        from tqdm.auto import tqdm

        # Batch 1: every probe output is returned, and a ViT's are ~200 MB a sample.
        for x in tqdm(inputs, desc="Layer sensitivity", unit="img", disable=len(inputs) < 8):
            try:
                res = request.infer(x if isinstance(x, dict) else {job.input_name: x[None]})
            except Exception as exc:
                raise QuantizationError(f"{method}: probe inference failed: {one_line(exc)}") from exc
            for i in range(len(probes)):
                q = res[2 * i].astype(np.float64)
                f = res[2 * i + 1].astype(np.float64)
                err[i] += np.square(q - f).sum()
                ref[i] += np.square(f).sum()
    scores = np.divide(err, ref, out=np.where(err > 0, np.inf, 0.0), where=ref > 0)
    ranked = [(name, float(s)) for (name, _, _), s in zip(probes, scores)]
    return sorted(ranked, key=lambda item: item[1], reverse=True)
