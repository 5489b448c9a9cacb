"""ONNX Runtime quantization methods: int8 dynamic, int8 static (QDQ), int4
weight-only (MatMulNBits), fp16, and the explicit-QDQ int8 ONNX that TensorRT builds from.

Each method is glue over ``onnxruntime.quantization`` (or ORT's fp16 converter):
it validates the options, runs the field's quantizer, and writes ``model.onnx``
(plus ``model.onnx.data`` past 2 GB) into ``job.out_dir``. Scratch files live in
a hidden folder inside ``job.out_dir`` that is removed before returning. The
shared plumbing is in :mod:`enginekit.quant.ort_graph`, calibration in
:mod:`enginekit.quant.ort_calibration`.

Choices measured on vit_small_patch16_384 (seeded weights, noise inputs, 2 CPU cores):

- Calibration feeds one sample per run. A batch of 8 gave the same speed and a
  peak RSS of 7.3 GB (MinMax) against 1.3 GB for batches of 1; the histogram
  calibrators (entropy, percentile) keep only one sample's tensors alive that way
  (0.9 GB) instead of every sample's (about 0.3 GB each).
- ORT's quant pre-processing (``quant_pre_process``) runs on our opset-18 exports
  but only splits each attention permute into three Transposes: the exporter
  already writes every value_info and the quantizers re-run shape inference.
  Same cosine, so it is skipped, and node names stay those of the float graph.
- Only weighted ops are quantized for the CPU (MatMul with a constant B, Gemm,
  Conv), inputs only. Quantizing MatMul/Gemm outputs too added a requantize per
  layer: 223 against 168 ms at batch 1, and a lower cosine. The attention MatMuls (two
  activations) gained no speed on CPU, so they stay float there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from enginekit.errors import QuantizationError
from enginekit.quant.base import MethodResult, QuantJob
from enginekit.quant.ort_calibration import as_feed, calibration_data, calibration_method, quantize_qdq
from enginekit.quant.ort_graph import (
    ENTRY,
    WEIGHTED_OPS,
    check_excluded,
    graph_nodes,
    is_large,
    load_model,
    masked_attention_scores,
    method_details,
    op_count,
    ort_errors,
    over_size_limit,
    quiet,
    save_model,
    scratch_dir,
    weighted_nodes,
    written_files,
)

__all__ = ["int8_dynamic", "int8_static", "int4_weight", "fp16", "bf16", "int8_qdq_tensorrt", "sensitivity"]


# -- methods ---------------------------------------------------------------------


def int8_dynamic(job: QuantJob) -> MethodResult:
    """int8 weights, activations quantized at run time (ORT ``quantize_dynamic``).

    Options: ``per_channel``, ``exclude_nodes``. Only MatMul with a constant B is
    quantized: ORT's dynamic quantizer has no Gemm kernel and rewrites Gemm into
    MatMul + Add itself (so the classifier head is covered), skips attention's
    activation-by-activation MatMuls (MatMulConstBOnly), and ConvInteger for the
    patch embedding was slower than float Conv (163 against 130 ms on vit_small).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = load_model(job)
    exclude = check_excluded(model, job)
    # The Gemm rewrite names its MatMul "<gemm>_MatMul": exclude that too.
    gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
    exclude += [f"{name}_MatMul" for name in exclude if name in gemms]
    # The rewrite transposes B in place; dynamo exports also record initializer
    # shapes in value_info, which then contradict the new shape and break ORT's
    # shape inference. Initializers carry their own shapes: drop those entries.
    inits = {i.name for i in model.graph.initializer}
    keep = [vi for vi in model.graph.value_info if vi.name not in inits]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)

    with quiet(), ort_errors("onnxruntime quantize_dynamic"):
        quantize_dynamic(
            model, job.out_dir / ENTRY, op_types_to_quantize=["MatMul"], per_channel=job.options.per_channel,
            reduce_range=False, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            use_external_data_format=over_size_limit(model),
        )
    quantized = op_count(job.out_dir / ENTRY, "MatMulInteger", "DynamicQuantizeMatMul")
    if quantized == 0:
        raise QuantizationError(f"{job.model.name} has no MatMul with constant weights left to quantize")
    granularity = "per-channel" if job.options.per_channel else "per-tensor"
    return MethodResult(
        kind="onnx", entry=ENTRY, files=written_files(job.out_dir), precision="int8",
        details=method_details("int8-dynamic", bits=8, weights=f"int8 symmetric {granularity}",
                         activations="dynamic uint8 (per-tensor range computed at run time)",
                         format="QOperator (DynamicQuantizeLinear + MatMulInteger)", op_types=["MatMul"],
                         quantized_nodes=quantized, per_channel=job.options.per_channel,
                         excluded_nodes=list(job.options.exclude_nodes)),
    )


def int8_static(job: QuantJob) -> MethodResult:
    """int8 weights and activations in QDQ format, calibrated on ``job.calibration``.

    Options: ``calibrate_method``, ``per_channel``, ``exclude_nodes``. Activations
    are asymmetric uint8: x86 VNNI's dot product (vpdpbusd) multiplies u8 by s8,
    which is what ORT's CPU kernels run natively and what ORT recommends for x86;
    uint8 also spends its full range on one-sided tensors (after GELU). Weights
    are symmetric int8.
    """
    calibration_data(job)  # fail on bad options before any work
    calibration_method(job.options.calibrate_method)
    model = load_model(job)
    exclude = check_excluded(model, job)
    nodes = weighted_nodes(model, exclude)
    del model
    quantize_qdq(
        job, activation="QUInt8", nodes=nodes, exclude=exclude, symmetric_calibration=None,
        # Inputs only: a Q/DQ on the MatMul output would requantize before the
        # bias Add; DQ -> MatMul fuses into one int8 kernel with a float output.
        extra_options={"OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS)},
    )
    granularity = "per-channel" if job.options.per_channel else "per-tensor"
    return MethodResult(
        kind="onnx", entry=ENTRY, files=written_files(job.out_dir), precision="int8",
        details=method_details("int8-static", bits=8, weights=f"int8 symmetric {granularity}",
                         activations="uint8 asymmetric per-tensor, calibrated", format="QDQ",
                         calibrate_method=job.options.calibrate_method, calibration_samples=len(job.calibration),
                         op_types=list(WEIGHTED_OPS), quantized_nodes=len(nodes), per_channel=job.options.per_channel,
                         reduce_range=False, pre_processed=False, excluded_nodes=list(job.options.exclude_nodes)),
    )


def int8_qdq_tensorrt(job: QuantJob) -> MethodResult:
    """Explicit-QDQ int8 ONNX for TensorRT: symmetric int8 activations and weights,
    per-channel weights, calibrated like :func:`int8_static`. Runs on ORT CPU too.

    Options: ``calibrate_method``, ``per_channel``, ``exclude_nodes``.
    """
    calibration_data(job)  # fail on bad options before any work
    calibration_method(job.options.calibrate_method)
    model = load_model(job)
    exclude = check_excluded(model, job)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise QuantizationError(
            f"{job.model.name} is opset {opset}; per-channel QDQ for TensorRT needs opset >= 13: re-export it"
        )
    # All MatMuls, attention's two activation-by-activation ones included: with
    # Q/DQ on their inputs TensorRT can pick its fused int8 attention kernels. Scores that
    # get a run-time mask (a token-merged ViT's log(size)) stay float: OpenVINO 2026.4's
    # CPU plugin miscomputes int8 scores plus a run-time mask at static shapes (top-1
    # agreement 0.45 on a merged ViT), and the mask's range is not the scores' anyway.
    masked = masked_attention_scores(model)
    skip = set(exclude) | set(masked)
    nodes = [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS and n.name not in skip]
    del model
    options = {
        # TensorRT's int8 is symmetric only: zero points must be 0.
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        # NVIDIA's placement rule: quantize the inputs of weighted ops, not their
        # outputs; TensorRT fuses bias, residual Add and the next layer's Q itself.
        "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS),
        # Keep float weights behind their own Q -> DQ pair (the QAT export form):
        # every TensorRT version quantizes them with the given per-channel scale,
        # and ORT CPU folds the Q at load. Pre-quantized int8 initializers would be
        # 3.7x smaller on disk but need a TensorRT that takes DQ-only weights.
        "AddQDQPairToWeight": True,
        # A Q/DQ pair per consumer, so each layer's fusion is decided on its own
        # (NVIDIA's ORT-based recipe in Model Optimizer sets the same).
        "DedicatedQDQPair": True,
        # Biases stay float: TensorRT's DequantizeLinear takes int8/fp8/int4, not
        # int32, and it adds the bias inside the fused kernel anyway.
        "QuantizeBias": False,
        # No Relu/Clip in a ViT today; if one appears it must stay an explicit op,
        # since TensorRT re-derives fusions from the graph, not from a folded Q range.
        "QDQKeepRemovableActivations": True,
        # Output channels: MatMul weights are (K, N), Conv weights (K, C, kH, kW).
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1, "Conv": 0},
    }
    quantize_qdq(job, activation="QInt8", nodes=nodes, exclude=exclude, extra_options=options,
                  symmetric_calibration=True)
    granularity = "per-channel" if job.options.per_channel else "per-tensor"
    return MethodResult(
        kind="onnx", entry=ENTRY, files=written_files(job.out_dir), precision="int8-qdq",
        details=method_details("int8-qdq", target="tensorrt", bits=8, symmetric=True,
                         weights=f"int8 symmetric {granularity} (Q/DQ pair on float weights)",
                         activations="int8 symmetric per-tensor, calibrated", format="QDQ", opset=opset,
                         calibrate_method=job.options.calibrate_method, calibration_samples=len(job.calibration),
                         op_types=list(WEIGHTED_OPS), quantized_nodes=len(nodes), per_channel=job.options.per_channel,
                         extra_options={k: v for k, v in options.items() if k != "QDQOpTypePerChannelSupportToAxis"},
                         excluded_nodes=list(job.options.exclude_nodes),
                         **({"float_masked_attention_scores": masked} if masked else {})),
    )


def int4_weight(job: QuantJob) -> MethodResult:
    """int4 weight-only: MatMul with constant weights becomes ``MatMulNBits``.

    Options: ``group_size`` (ORT block size along K), ``symmetric``, ``exclude_nodes``.
    ORT's default algorithm (round to nearest, per block); activations stay float32.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    block = job.options.group_size
    if block < 16 or block & (block - 1):
        raise QuantizationError(f"group_size must be a power of two >= 16 (the MatMulNBits block size), got {block}")
    model = load_model(job)
    exclude = check_excluded(model, job)
    targets = [n for n in weighted_nodes(model, exclude) if graph_nodes(model)[n].op_type == "MatMul"]
    if not targets:
        raise QuantizationError(f"{job.model.name} has no MatMul with constant weights left to quantize")
    with quiet(), ort_errors("onnxruntime MatMulNBitsQuantizer"):
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=job.options.symmetric,
                                         nodes_to_exclude=exclude)
        quantizer.process()
        files = save_model(quantizer.model.model, job.out_dir)
    quantized = op_count(job.out_dir / ENTRY, "MatMulNBits")
    scheme = "symmetric" if job.options.symmetric else "asymmetric"
    return MethodResult(
        kind="onnx", entry=ENTRY, files=files, precision="int4",
        details=method_details("int4-weight", bits=4, weights=f"int4 {scheme}, blocks of {block} along K",
                         activations="float32", format="MatMulNBits (com.microsoft)", algorithm="RTN",
                         group_size=block, symmetric=job.options.symmetric, quantized_nodes=quantized,
                         excluded_nodes=list(job.options.exclude_nodes)),
    )


def fp16(job: QuantJob) -> MethodResult:
    """fp16 weights and compute, float32 graph inputs and outputs (Casts at the edges).

    Options: ``exclude_nodes`` (kept in float32). The converter's default op block
    list is enough: ORT's fp16 LayerNormalization and Softmax accumulate in float32
    (an fp16 LayerNorm over values of std 600, whose squares overflow fp16, matched
    float32 to 4 digits), and vit_small's logits kept a cosine of 1.00000.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_model(job)
    exclude = check_excluded(model, job)
    with quiet(), ort_errors("onnxruntime fp16 conversion"):
        # Past 2 GB onnx's in-memory shape inference cannot serialize the model;
        # the exporter's value_info already types every tensor.
        converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=exclude,
                                             disable_shape_infer=over_size_limit(model))
        files = save_model(converted, job.out_dir)
    return MethodResult(
        kind="onnx", entry=ENTRY, files=files, precision="fp16",
        details=method_details("fp16", bits=16, weights="float16", activations="float16", io="float32",
                         format="ONNX float16", op_block_list="onnxruntime default (float16.DEFAULT_OP_BLOCK_LIST)",
                         excluded_nodes=list(job.options.exclude_nodes))
        | {"library": "onnxruntime.transformers.float16"},
    )


def bf16(job: QuantJob) -> MethodResult:
    """bf16 weights: export's tensor-by-tensor pass (:mod:`enginekit.export.compress`), each
    float32 weight of at least 1024 values stored in bfloat16 with a ``Cast`` to float32 where it
    is read; half the bytes on disk, float32 compute (ONNX Runtime folds the casts at load)."""
    from enginekit.export.compress import WeightFormat, compress_component, written_files as compressed_files

    if job.options.exclude_nodes:
        raise QuantizationError("bf16 stores every large weight in bf16; it keeps no nodes in float (drop --exclude)")
    record = compress_component(job.model.parent, WeightFormat("bf16"), job.out_dir, entry=job.model.name)
    files = tuple(compressed_files(job.out_dir, job.model.name))
    return MethodResult(kind="onnx", entry=job.model.name, files=files, precision="bf16",
                        details=method_details("bf16", bits=16, weights="bfloat16, Cast to float32 where read",
                                               activations="float32", **{k: v for k, v in record.items()
                                                                         if k not in ("method",)}))


# -- sensitivity -------------------------------------------------------------------


def sensitivity(job: QuantJob, eval_inputs: Any) -> list[tuple[str, float]]:
    """Rank the nodes :func:`int8_static` quantizes by the error each one adds.

    Quantizes once (into scratch), then runs the float and the QDQ model over
    ``eval_inputs`` with every quantized node's inputs and outputs exposed (ORT's
    ``qdq_loss_debug``: ``modify_model_output_intermediate_tensors`` and
    ``create_activation_matching``). For each node, ``e_out`` is the relative L2
    error of its output against the float model and ``e_in`` that of its
    activation input before its own quantization; the score is the error the
    node adds, ``sqrt(max(e_out**2 - e_in**2, 0))``, so a late layer is not
    blamed for what it inherited. Returns ``(node name, score)``, worst first;
    the names are float-graph names that ``exclude_nodes`` accepts.

    Activations are reduced one sample at a time: ORT's ``collect_activations``
    keeps every sample's tensors (gigabytes on vit_small at 384) and opens a new
    session per call, so its loop is redone here over one session per model.
    """
    x = _eval_inputs(eval_inputs)
    with scratch_dir(job) as scratch:
        qjob = QuantJob(job.model, scratch / "int8", job.input_name, job.calibration, job.options)
        qjob.out_dir.mkdir()
        int8_static(qjob)
        quantized, float_nodes = _quantized_nodes(job.model, qjob.out_dir / ENTRY)
        if not quantized:
            return []
        with quiet(), ort_errors("onnxruntime qdq_loss_debug"):
            sessions = _debug_sessions(job, qjob.out_dir / ENTRY, scratch)
            sums = _error_sums(job, x, sessions, quantized, float_nodes)
    scores = []
    for name, (f_out, d_out, f_in, d_in) in sums.items():
        e_out = np.sqrt(d_out / f_out) if f_out > 0 else 0.0
        e_in = np.sqrt(d_in / f_in) if f_in > 0 else 0.0
        scores.append((name, float(np.sqrt(max(e_out**2 - e_in**2, 0.0)))))
    return sorted(scores, key=lambda item: item[1], reverse=True)


def _eval_inputs(eval_inputs: Any) -> Any:
    """Feed dicts (a pipeline's denoiser) as a list, or images as a float32 (N, C, H, W) array."""
    if isinstance(eval_inputs, (list, tuple)):
        if not eval_inputs:
            raise QuantizationError("eval_inputs must be a non-empty list of feed dicts")
        return list(eval_inputs)
    x = np.asarray(eval_inputs)
    if x.ndim != 4 or len(x) == 0:
        raise QuantizationError(f"eval_inputs must be a non-empty (N, C, H, W) array, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _quantized_nodes(float_path: Path, qdq_path: Path) -> tuple[list[Any], dict[str, Any]]:
    """What quantize_static actually quantized (weighted nodes fed by a DequantizeLinear),
    and the float graph's nodes by name."""
    import onnx

    qdq = onnx.load(str(qdq_path), load_external_data=False)
    producer = {o: n for n in qdq.graph.node for o in n.output}
    float_nodes = graph_nodes(onnx.load(str(float_path), load_external_data=False))
    quantized = [n for n in qdq.graph.node if n.op_type in WEIGHTED_OPS and n.name in float_nodes
                 and n.input[0] in producer and producer[n.input[0]].op_type == "DequantizeLinear"]
    return quantized, float_nodes


def _debug_sessions(job: QuantJob, qdq_path: Path, scratch: Path) -> list[Any]:
    """The float and the QDQ model with every quantized node's tensors exposed, one session each."""
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import modify_model_output_intermediate_tensors

    large = is_large(job)
    modify_model_output_intermediate_tensors(job.model, scratch / "float-debug.onnx",
                                             list(WEIGHTED_OPS), save_as_external_data=large)
    # Q/DQ tensors too, so the matching sees each input before and after quantization.
    modify_model_output_intermediate_tensors(qdq_path, scratch / "qdq-debug.onnx",
                                             [*WEIGHTED_OPS, "QuantizeLinear", "DequantizeLinear"],
                                             save_as_external_data=large)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as collect_activations
    so.log_severity_level = 3
    return [ort.InferenceSession(str(scratch / f), so, providers=["CPUExecutionProvider"])
            for f in ("float-debug.onnx", "qdq-debug.onnx")]


def _error_sums(job: QuantJob, x: Any, sessions: list[Any], quantized: list[Any],
                float_nodes: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per node, over every sample: |f_out|^2, |f_out - q_out|^2, |f_in|^2, |f_in - q_in (pre-QDQ)|^2."""
    from onnxruntime.quantization.qdq_loss_debug import create_activation_matching
    from tqdm.auto import tqdm

    sums = {n.name: np.zeros(4) for n in quantized}
    for i in tqdm(range(len(x)), desc="sensitivity", unit="sample", leave=False, delay=2):
        feed = as_feed(job.input_name, x[i])
        f_acts, q_acts = (_saved_tensors(s, feed) for s in sessions)
        # The matching takes collect_activations' shape: {name: [one array per run]}.
        match = create_activation_matching({k: [v] for k, v in q_acts.items()},
                                           {k: [v] for k, v in f_acts.items()})
        for node in quantized:
            out_f, out_q = f_acts.get(float_nodes[node.name].output[0]), q_acts.get(node.output[0])
            if out_f is None or out_q is None:
                continue
            acc = sums[node.name]
            acc[0] += _sq(out_f)
            acc[1] += _sq(out_f - out_q)
            pair = match.get(float_nodes[node.name].input[0], {})
            if "float" in pair:
                acc[2] += _sq(pair["float"][0])
                acc[3] += _sq(pair["float"][0] - pair["pre_qdq"][0])
    return sums


def _saved_tensors(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One run of a ``modify_model_output_intermediate_tensors`` model: {tensor name: flat values}."""
    from onnxruntime.quantization import qdq_loss_debug

    # What the augmenter appends to each exposed tensor's name.
    suffix = getattr(qdq_loss_debug, "_TENSOR_SAVE_POSTFIX", "_ReshapedSavedOutput")
    names = [o.name for o in session.get_outputs()]
    return {n[: -len(suffix)]: v for n, v in zip(names, session.run(None, feeds)) if n.endswith(suffix)}


def _sq(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.dot(a.ravel(), a.ravel()))
