"""ONNX Runtime quantization methods: int8 dynamic, int8 static (QDQ), int4
weight-only (MatMulNBits), fp16, and the explicit-QDQ int8 ONNX that TensorRT builds from.

Each method is glue over ``onnxruntime.quantization`` (or ORT's fp16 converter):
it validates the options, runs the field's quantizer, and writes ``model.onnx``
(plus ``model.onnx.data`` past 2 GB) into ``job.out_dir``. Scratch files live in
a hidden folder inside ``job.out_dir`` that is removed before returning.

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

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.errors import QuantizationError
from enginekit.quant.base import CALIBRATION_METHODS, MethodResult, QuantJob

__all__ = ["int8_dynamic", "int8_static", "int4_weight", "fp16", "int8_qdq_tensorrt", "sensitivity"]

ENTRY = "model.onnx"
DATA = "model.onnx.data"
#: Past this many bytes a model is saved with its tensors in ``model.onnx.data`` (protobuf stops at 2 GB).
_EXTERNAL_DATA_BYTES = 1_800_000_000
#: Weighted op types: what the int8 methods quantize.
_WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")


# -- shared plumbing ---------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mute the quantizers' chatter: root-logger warnings ("consider pre-processing"),
    Python warnings and the histogram collector's ``print`` calls. Errors still raise."""
    root = logging.getLogger()
    # logging.warning() on a root logger without handlers installs one for the
    # whole process (basicConfig); a temporary NullHandler prevents that.
    guard = logging.NullHandler() if not root.handlers else None
    if guard:
        root.addHandler(guard)
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        if guard:
            root.removeHandler(guard)


@contextlib.contextmanager
def _ort_errors(what: str) -> Iterator[None]:
    """Re-raise a quantizer failure as a one-line QuantizationError."""
    try:
        yield
    except QuantizationError:
        raise
    except Exception as exc:  # the quantizers raise bare Exception, AssertionError, onnx errors...
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        detail = lines[0] if lines else type(exc).__name__
        raise QuantizationError(f"{what} failed: {detail}") from exc


@contextlib.contextmanager
def _scratch(job: QuantJob) -> Iterator[Path]:
    """A scratch folder inside ``job.out_dir`` (same disk as the result), always removed."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".scratch-", dir=job.out_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _model_bytes(model: Path) -> int:
    """Size of a model file with its external data (the files beside it that it names)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(str(model), load_external_data=False)
    locations = set()
    for init in proto.graph.initializer:
        if uses_external_data(init):
            locations.update(e.value for e in init.external_data if e.key == "location")
    return model.stat().st_size + sum((model.parent / loc).stat().st_size for loc in locations)


def _large(job: QuantJob) -> bool:
    return _model_bytes(job.model) > _EXTERNAL_DATA_BYTES


def _load(job: QuantJob) -> Any:
    import onnx

    if not job.model.is_file():
        raise QuantizationError(f"{job.model}: no such ONNX model")
    with _ort_errors(f"onnx.load of {job.model}"):
        return onnx.load(str(job.model))


def _graph_nodes(model: Any) -> dict[str, Any]:
    return {n.name: n for n in model.graph.node}


def _check_excluded(model: Any, job: QuantJob) -> list[str]:
    """``exclude_nodes`` must name nodes of the float graph: a typo would otherwise exclude nothing."""
    names = _graph_nodes(model)
    unknown = [n for n in job.options.exclude_nodes if n not in names]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise QuantizationError(
            f"exclude_nodes names no node of {job.model.name}: {shown}; give node names of the float ONNX graph"
        )
    return list(job.options.exclude_nodes)


def _weighted_nodes(model: Any, exclude: Sequence[str] = ()) -> list[str]:
    """MatMul with a constant B, Gemm and Conv nodes: the layers that carry weights."""
    inits = {i.name for i in model.graph.initializer}
    skip = set(exclude)
    return [
        n.name
        for n in model.graph.node
        if n.name not in skip
        and (n.op_type in ("Gemm", "Conv") or (n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits))
    ]


def _save(model: Any, out_dir: Path) -> tuple[str, ...]:
    """Save a ModelProto as ``model.onnx``, external data past 2 GB."""
    import onnx

    external = model.ByteSize() > _EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(out_dir / ENTRY), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=DATA)
    return _written(out_dir)


def _written(out_dir: Path) -> tuple[str, ...]:
    return (ENTRY,) + ((DATA,) if (out_dir / DATA).exists() else ())


def _op_count(path: Path, *op_types: str) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(1 for n in graph.node if n.op_type in op_types)


def _details(method: str, **fields: Any) -> dict[str, Any]:
    import onnxruntime

    return {"method": method, **fields, "library": "onnxruntime.quantization",
            "onnxruntime_version": onnxruntime.__version__}


# -- calibration ---------------------------------------------------------------


def _calibration(job: QuantJob) -> Any:
    """The calibration samples: an (N, C, H, W) float32 array, or a list of feed dicts."""
    data = job.calibration
    if data is None:
        raise QuantizationError(
            "static quantization needs calibration data: give --calibration (a folder of images or an .npy file)"
        )
    if isinstance(data, (list, tuple)):
        if not data or not all(isinstance(d, Mapping) for d in data):
            raise QuantizationError("calibration feeds must be a non-empty list of {input name: array} dicts")
        return list(data)
    data = np.asarray(data)
    if data.ndim != 4 or len(data) == 0:
        raise QuantizationError(f"calibration data must be a non-empty (N, C, H, W) array, got shape {data.shape}")
    return np.ascontiguousarray(data, dtype=np.float32)


def _calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if name not in methods:
        raise QuantizationError(f"unknown calibrate_method {name!r}; use one of: {', '.join(CALIBRATION_METHODS)}")
    return methods[name]


def _feed(input_name: str, sample: Any) -> dict[str, np.ndarray]:
    """One sample as a feed: a dict as it is, an image (C, H, W) as a batch of one."""
    return dict(sample) if isinstance(sample, Mapping) else {input_name: sample[None]}


def _one_sample_reader(feed: dict[str, np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _OneSample(CalibrationDataReader):
        def __init__(self) -> None:
            self._feed: dict[str, np.ndarray] | None = feed

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed, self._feed = self._feed, None
            return feed

    return _OneSample()


def _calibrate(job: QuantJob, op_types: Sequence[str], scratch: Path, *, symmetric: bool | None = None) -> Path:
    """Run ORT's calibrator over ``job.calibration`` one sample at a time; return its range cache.

    quantize_static would run the whole reader through one ``collect_data`` call,
    which keeps every sample's intermediate tensors for the histogram calibrators
    (about 0.3 GB a sample on vit_small at 384); here each call sees one sample,
    the calibrator merges as it goes, and the progress bar ticks per sample.
    ORT's default bins are kept: TensorRT-style 2048-bin entropy took 352 s
    instead of 63 s on vit_small for the same cosine.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from tqdm.auto import tqdm

    data = _calibration(job)
    method = _calibration_method(job.options.calibrate_method)
    extra = {} if symmetric is None else {"symmetric": symmetric}
    cache = scratch / "calibration.json"
    with _quiet(), _ort_errors(f"onnxruntime calibration ({job.options.calibrate_method})"):
        calibrator = create_calibrator(
            job.model, list(op_types), augmented_model_path=str(scratch / "augmented.onnx"),
            calibrate_method=method, use_external_data_format=_large(job), extra_options=extra,
        )
        bar = tqdm(data, desc=f"calibrating ({job.options.calibrate_method})", unit="sample", leave=False, delay=2)
        for sample in bar:
            calibrator.collect_data(_one_sample_reader(_feed(job.input_name, sample)))
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
    return cache


def _quantize_qdq(job: QuantJob, *, activation: str, nodes: list[str], exclude: list[str],
                  extra_options: dict[str, Any], symmetric_calibration: bool | None) -> None:
    """Calibrate, then quantize_static in QDQ format into ``job.out_dir/model.onnx``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if not nodes:
        raise QuantizationError(f"{job.model.name} has no MatMul/Gemm/Conv node left to quantize")
    with _scratch(job) as scratch:
        cache = _calibrate(job, _WEIGHTED_OPS, scratch, symmetric=symmetric_calibration)
        with _quiet(), _ort_errors("onnxruntime quantize_static"):
            quantize_static(
                job.model, job.out_dir / ENTRY, calibration_data_reader=None, calibration_cache_path=cache,
                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(_WEIGHTED_OPS),
                nodes_to_quantize=nodes, nodes_to_exclude=exclude, per_channel=job.options.per_channel,
                reduce_range=False, activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8,
                calibrate_method=_calibration_method(job.options.calibrate_method),
                use_external_data_format=_large(job), extra_options=extra_options,
            )


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

    model = _load(job)
    exclude = _check_excluded(model, job)
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

    with _quiet(), _ort_errors("onnxruntime quantize_dynamic"):
        quantize_dynamic(
            model, job.out_dir / ENTRY, op_types_to_quantize=["MatMul"], per_channel=job.options.per_channel,
            reduce_range=False, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
            use_external_data_format=model.ByteSize() > _EXTERNAL_DATA_BYTES,
        )
    quantized = _op_count(job.out_dir / ENTRY, "MatMulInteger", "DynamicQuantizeMatMul")
    if quantized == 0:
        raise QuantizationError(f"{job.model.name} has no MatMul with constant weights left to quantize")
    granularity = "per-channel" if job.options.per_channel else "per-tensor"
    return MethodResult(
        kind="onnx", entry=ENTRY, files=_written(job.out_dir), precision="int8",
        details=_details("int8-dynamic", bits=8, weights=f"int8 symmetric {granularity}",
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
    _calibration(job)  # fail on bad options before any work
    _calibration_method(job.options.calibrate_method)
    model = _load(job)
    exclude = _check_excluded(model, job)
    nodes = _weighted_nodes(model, exclude)
    del model
    _quantize_qdq(
        job, activation="QUInt8", nodes=nodes, exclude=exclude, symmetric_calibration=None,
        # Inputs only: a Q/DQ on the MatMul output would requantize before the
        # bias Add; DQ -> MatMul fuses into one int8 kernel with a float output.
        extra_options={"OpTypesToExcludeOutputQuantization": list(_WEIGHTED_OPS)},
    )
    granularity = "per-channel" if job.options.per_channel else "per-tensor"
    return MethodResult(
        kind="onnx", entry=ENTRY, files=_written(job.out_dir), precision="int8",
        details=_details("int8-static", bits=8, weights=f"int8 symmetric {granularity}",
                         activations="uint8 asymmetric per-tensor, calibrated", format="QDQ",
                         calibrate_method=job.options.calibrate_method, calibration_samples=len(job.calibration),
                         op_types=list(_WEIGHTED_OPS), quantized_nodes=len(nodes), per_channel=job.options.per_channel,
                         reduce_range=False, pre_processed=False, excluded_nodes=list(job.options.exclude_nodes)),
    )


def int8_qdq_tensorrt(job: QuantJob) -> MethodResult:
    """Explicit-QDQ int8 ONNX for TensorRT: symmetric int8 activations and weights,
    per-channel weights, calibrated like :func:`int8_static`. Runs on ORT CPU too.

    Options: ``calibrate_method``, ``per_channel``, ``exclude_nodes``.
    """
    _calibration(job)  # fail on bad options before any work
    _calibration_method(job.options.calibrate_method)
    model = _load(job)
    exclude = _check_excluded(model, job)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise QuantizationError(
            f"{job.model.name} is opset {opset}; per-channel QDQ for TensorRT needs opset >= 13: re-export it"
        )
    # All MatMuls, attention's two activation-by-activation ones included: with
    # Q/DQ on their inputs TensorRT can pick its fused int8 attention kernels.
    skip = set(exclude)
    nodes = [n.name for n in model.graph.node if n.op_type in _WEIGHTED_OPS and n.name not in skip]
    del model
    options = {
        # TensorRT's int8 is symmetric only: zero points must be 0.
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        # NVIDIA's placement rule: quantize the inputs of weighted ops, not their
        # outputs; TensorRT fuses bias, residual Add and the next layer's Q itself.
        "OpTypesToExcludeOutputQuantization": list(_WEIGHTED_OPS),
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
    _quantize_qdq(job, activation="QInt8", nodes=nodes, exclude=exclude, extra_options=options,
                  symmetric_calibration=True)
    granularity = "per-channel" if job.options.per_channel else "per-tensor"
    return MethodResult(
        kind="onnx", entry=ENTRY, files=_written(job.out_dir), precision="int8-qdq",
        details=_details("int8-qdq", target="tensorrt", bits=8, symmetric=True,
                         weights=f"int8 symmetric {granularity} (Q/DQ pair on float weights)",
                         activations="int8 symmetric per-tensor, calibrated", format="QDQ", opset=opset,
                         calibrate_method=job.options.calibrate_method, calibration_samples=len(job.calibration),
                         op_types=list(_WEIGHTED_OPS), quantized_nodes=len(nodes), per_channel=job.options.per_channel,
                         extra_options={k: v for k, v in options.items() if k != "QDQOpTypePerChannelSupportToAxis"},
                         excluded_nodes=list(job.options.exclude_nodes)),
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
    model = _load(job)
    exclude = _check_excluded(model, job)
    targets = [n for n in _weighted_nodes(model, exclude) if _graph_nodes(model)[n].op_type == "MatMul"]
    if not targets:
        raise QuantizationError(f"{job.model.name} has no MatMul with constant weights left to quantize")
    with _quiet(), _ort_errors("onnxruntime MatMulNBitsQuantizer"):
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=job.options.symmetric,
                                         nodes_to_exclude=exclude)
        quantizer.process()
        files = _save(quantizer.model.model, job.out_dir)
    quantized = _op_count(job.out_dir / ENTRY, "MatMulNBits")
    scheme = "symmetric" if job.options.symmetric else "asymmetric"
    return MethodResult(
        kind="onnx", entry=ENTRY, files=files, precision="int4",
        details=_details("int4-weight", bits=4, weights=f"int4 {scheme}, blocks of {block} along K",
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

    model = _load(job)
    exclude = _check_excluded(model, job)
    with _quiet(), _ort_errors("onnxruntime fp16 conversion"):
        # Past 2 GB onnx's in-memory shape inference cannot serialize the model;
        # the exporter's value_info already types every tensor.
        converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=exclude,
                                             disable_shape_infer=model.ByteSize() > _EXTERNAL_DATA_BYTES)
        files = _save(converted, job.out_dir)
    return MethodResult(
        kind="onnx", entry=ENTRY, files=files, precision="fp16",
        details=_details("fp16", bits=16, weights="float16", activations="float16", io="float32",
                         format="ONNX float16", op_block_list="onnxruntime default (float16.DEFAULT_OP_BLOCK_LIST)",
                         excluded_nodes=list(job.options.exclude_nodes))
        | {"library": "onnxruntime.transformers.float16"},
    )


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
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.qdq_loss_debug import (
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )
    from tqdm.auto import tqdm

    if isinstance(eval_inputs, (list, tuple)):  # feed dicts (a pipeline's denoiser)
        if not eval_inputs:
            raise QuantizationError("eval_inputs must be a non-empty list of feed dicts")
        x: Any = list(eval_inputs)
    else:
        x = np.asarray(eval_inputs)
        if x.ndim != 4 or len(x) == 0:
            raise QuantizationError(f"eval_inputs must be a non-empty (N, C, H, W) array, got shape {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
    with _scratch(job) as scratch:
        qjob = QuantJob(job.model, scratch / "int8", job.input_name, job.calibration, job.options)
        qjob.out_dir.mkdir()
        int8_static(qjob)
        large = _large(job)
        qdq_path = qjob.out_dir / ENTRY
        qdq = onnx.load(str(qdq_path), load_external_data=False)
        producer = {o: n for n in qdq.graph.node for o in n.output}
        float_nodes = _graph_nodes(onnx.load(str(job.model), load_external_data=False))
        # What quantize_static actually quantized: weighted nodes fed by a DequantizeLinear.
        quantized = [n for n in qdq.graph.node if n.op_type in _WEIGHTED_OPS and n.name in float_nodes
                     and n.input[0] in producer and producer[n.input[0]].op_type == "DequantizeLinear"]
        if not quantized:
            return []
        with _quiet(), _ort_errors("onnxruntime qdq_loss_debug"):
            modify_model_output_intermediate_tensors(job.model, scratch / "float-debug.onnx",
                                                     list(_WEIGHTED_OPS), save_as_external_data=large)
            # Q/DQ tensors too, so the matching sees each input before and after quantization.
            modify_model_output_intermediate_tensors(qdq_path, scratch / "qdq-debug.onnx",
                                                     [*_WEIGHTED_OPS, "QuantizeLinear", "DequantizeLinear"],
                                                     save_as_external_data=large)
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as collect_activations
            so.log_severity_level = 3
            sessions = [ort.InferenceSession(str(scratch / f), so, providers=["CPUExecutionProvider"])
                        for f in ("float-debug.onnx", "qdq-debug.onnx")]
            # Per node: |f_out|^2, |f_out - q_out|^2, |f_in|^2, |f_in - q_in (pre-QDQ)|^2
            sums = {n.name: np.zeros(4) for n in quantized}
            for i in tqdm(range(len(x)), desc="sensitivity", unit="sample", leave=False, delay=2):
                feed = _feed(job.input_name, x[i])
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
    scores = []
    for name, (f_out, d_out, f_in, d_in) in sums.items():
        e_out = np.sqrt(d_out / f_out) if f_out > 0 else 0.0
        e_in = np.sqrt(d_in / f_in) if f_in > 0 else 0.0
        scores.append((name, float(np.sqrt(max(e_out**2 - e_in**2, 0.0)))))
    return sorted(scores, key=lambda item: item[1], reverse=True)


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
