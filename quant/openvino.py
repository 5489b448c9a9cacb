"""OpenVINO quantization methods: thin glue over NNCF and ``ov.save_model``.

Each method converts the float ONNX model with ``ov.convert_model``, hands it
to NNCF (or, for fp16, only to the IR writer) and writes ``model.xml`` +
``model.bin`` into ``job.out_dir``: an "openvino" artifact that
:class:`enginekit.runtimes.openvino.OpenVINOBackend` loads.

- ``int8_static``: ``nncf.quantize`` with the transformer model type and the
  mixed preset (symmetric int8 weights per output channel, asymmetric int8
  activations), SmoothQuant and fast bias correction as NNCF does by default
  for transformers. Activations become ``FakeQuantize`` ops; weights are
  stored as int8 constants.
- ``int8_weight``: ``nncf.compress_weights`` INT8_ASYM (weights only, int8
  per output channel with a zero point; activations stay float).
- ``int4_weight``: ``nncf.compress_weights`` INT4_SYM / INT4_ASYM with a group
  size and a ratio; convolutions (a ViT's patch embedding), embeddings and the
  last layer stay int8 (NNCF's default).
- ``fp16``: fp16 weights in the IR, nothing else.
- ``sensitivity``: which layers int8-static hurts most, for the fallback that
  keeps them in float (``QuantOptions.exclude_nodes`` take the names it returns).

Node names in ``exclude_nodes`` are OpenVINO operation names (friendly names of
the converted model), which is also how NNCF names its graph nodes.

Each result's ``details["inference_precision_hint"]`` is the run-time precision
the artifact's target records (the runner applies it, the fidelity gate
measures it). On CPU, int8 kernels run whatever the hint; the hint sets the
precision of everything else:

- int8-static: ``f32``. Quantized MatMuls and convolutions still run int8 (u8/i8
  FullyConnected); LayerNorm, softmax and residual adds stay f32. ``bf16``
  would add reorders between i8, bf16 and f32 and is slower as well as less
  exact (vit_small_patch16_384 on an AMX Xeon: 165 ms against 245 ms).
- int8-weight, int4-weight, fp16: ``default`` (the device's choice: bf16 on AMX
  CPUs, f16 on GPUs, f32 elsewhere). Compressed weights are decompressed inside
  the kernel either way, and under ``f32`` the CPU still quantizes activations
  dynamically (DYNAMIC_QUANTIZATION_GROUP_SIZE 32), so ``f32`` buys no
  exactness and costs 1.6-3.5x (205 ms against 337 ms for int8-weight).
"""

from __future__ import annotations

import contextlib
import logging
from importlib import metadata
from typing import Any, Iterator

import numpy as np

from enginekit.errors import QuantizationError, one_line
from enginekit.quant.base import MethodResult, QuantJob, QuantOptions

__all__ = ["int8_static", "int8_weight", "int4_weight", "int8_hybrid", "fp16", "fp32", "sensitivity"]

_KIND = "openvino"
_ENTRY = "model.xml"
_FILES = ("model.xml", "model.bin")
#: NNCF's preset for transformers: symmetric weights, asymmetric activations
#: (post-GELU and post-LayerNorm activations are far from zero-centred).
_PRESET = "mixed"
#: Ops that only move or reshape data: quantization noise passes through them
#: unchanged, so ``sensitivity`` charges it to the first real op downstream.
_DATA_MOVEMENT = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "VariadicSplit", "Gather",
    "StridedSlice", "Slice", "Broadcast", "Tile", "Convert", "DepthToSpace", "SpaceToDepth",
})
#: Ops whose output does not depend on input values.
_NO_VALUE = frozenset({"ShapeOf", "FakeQuantize", "Result", "Parameter", "Constant"})


def _openvino() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise QuantizationError("openvino quantization needs openvino: pip install 'enginekit[openvino]'") from exc
    return ov


def _versions(nncf: Any | None) -> dict[str, str]:
    ov = _openvino()
    try:
        ov_version = metadata.version("openvino")
    except metadata.PackageNotFoundError:
        ov_version = str(ov.__version__)
    out = {"openvino_version": ov_version}
    if nncf is not None:
        out = {"library": "nncf", "nncf_version": str(nncf.__version__), **out}
    return out


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[Any]:
    """nncf, imported, with its INFO logging off until the block ends.

    NNCF's rich progress bars (statistics collection, SmoothQuant, bias
    correction) are not logging and stay: they are the progress indication
    for a long calibration. The level is restored afterwards, so importing or
    calling this module changes no global logging state.
    """
    # nncf loads parts of torch on the way; torch's cpp_extension warns about a missing CUDA when it does.
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    saved_torch = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        try:
            import nncf
            from nncf.common.logging.logger import nncf_logger
        except ImportError as exc:
            raise QuantizationError("openvino quantization needs nncf: pip install 'enginekit[quant]'") from exc
        saved = (nncf_logger.level, [h.level for h in nncf_logger.handlers])
        nncf.set_log_level(logging.ERROR)
        try:
            yield nncf
        finally:
            nncf_logger.setLevel(saved[0])
            for handler, level in zip(nncf_logger.handlers, saved[1]):
                handler.setLevel(level)
    finally:
        torch_log.setLevel(saved_torch)


def _read(job: QuantJob, method: str) -> Any:
    """The float model, converted from ONNX, with ``job.input_name`` checked."""
    ov = _openvino()
    try:
        model = ov.convert_model(str(job.model))
    except Exception as exc:
        raise QuantizationError(f"{method}: openvino could not convert {job.model.name}: {one_line(exc)}") from exc
    names = set().union(*(p.get_names() for p in model.inputs))
    if job.input_name not in names:
        have = ", ".join(sorted(names))
        raise QuantizationError(f"{method}: the model has no input {job.input_name!r} (inputs: {have})")
    return model


def _save(model: Any, job: QuantJob, method: str, *, fp16: bool = False) -> None:
    ov = _openvino()
    try:
        job.out_dir.mkdir(parents=True, exist_ok=True)
        # compress_to_fp16 defaults to True in save_model: only the fp16 method wants it.
        ov.save_model(model, str(job.out_dir / _ENTRY), compress_to_fp16=fp16)
    except Exception as exc:
        raise QuantizationError(f"{method}: could not write the IR to {job.out_dir}: {one_line(exc)}") from exc


def _batch(x: np.ndarray | None, method: str, what: str) -> np.ndarray:
    """``x`` as a float32 (N, C, H, W) batch, N >= 1, or a QuantizationError."""
    if x is None:
        raise QuantizationError(f"{method} needs {what} (N, 3, H, W) float32 images; none were given")
    arr = np.asarray(x)
    if arr.ndim != 4 or len(arr) == 0 or not np.issubdtype(arr.dtype, np.floating):
        raise QuantizationError(
            f"{method}: {what} must be a non-empty (N, C, H, W) float array, got {arr.dtype} {arr.shape}"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def _feeds(x: Any, method: str) -> list[dict[str, np.ndarray]] | None:
    """``x`` as a list of feed dicts when it is one (a pipeline's recorded denoiser inputs), else None."""
    if not isinstance(x, (list, tuple)):
        return None
    if not x or not all(isinstance(d, dict) for d in x):
        raise QuantizationError(f"{method}: calibration feeds must be a non-empty list of {{input: array}} dicts")
    return [dict(d) for d in x]


def _dataset(nncf: Any, images: Any, input_name: str) -> Any:
    if isinstance(images, list):  # feed dicts, each one model call
        return nncf.Dataset(images)
    # One sample per item, batch 1: NNCF counts items for subset_size, and
    # per-sample statistics are what its range estimators average over.
    return nncf.Dataset(list(images), lambda x: {input_name: x[None]})


def _ignored_scope(nncf: Any, model: Any, exclude: tuple[str, ...], method: str) -> Any:
    if not exclude:
        return None
    names = {op.get_friendly_name() for op in model.get_ops()}
    missing = [n for n in exclude if n not in names]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise QuantizationError(
            f"{method}: exclude_nodes not in the OpenVINO model: {shown} "
            "(use OpenVINO op names, e.g. from sensitivity())"
        )
    return nncf.IgnoredScope(names=list(exclude), validate=True)


def _range_estimator(calibrate_method: str, method: str) -> tuple[str, Any]:
    """Our calibrate_method name -> (the NNCF estimator, recorded by name, and its parameters)."""
    from nncf.quantization.range_estimator import RangeEstimatorParameters, RangeEstimatorParametersSet

    if calibrate_method == "minmax":
        # Empty parameters: NNCF's default, for per-tensor activations the mean
        # over samples of the per-sample min and max.
        return "mean_minmax", RangeEstimatorParameters()
    if calibrate_method == "percentile":
        return "mean_quantile", RangeEstimatorParametersSet.MEAN_QUANTILE
    if calibrate_method == "entropy":
        # NNCF has no KL-divergence calibration; its histogram estimator (the
        # range that minimises quantization error over a histogram) is the nearest.
        return "histogram", RangeEstimatorParametersSet.HISTOGRAM
    raise QuantizationError(
        f"{method}: calibrate_method must be minmax, percentile or entropy, got {calibrate_method!r}"
    )


def _quantize(
    nncf: Any, model: Any, job: QuantJob, images: np.ndarray, method: str, *, fold_weights: bool
) -> tuple[Any, str]:
    """``nncf.quantize`` with our options; returns the model and the range estimator used.

    ``fold_weights=False`` keeps weight quantizers as FakeQuantize on float
    constants (sensitivity needs the float weights); the saved IR folds them
    into int8 constants.
    """
    from nncf.openvino.quantization.backend_parameters import BackendParameters
    from nncf.quantization.advanced_parameters import QuantizationParameters

    options = job.options
    estimator_name, estimator = _range_estimator(options.calibrate_method, method)
    advanced = nncf.AdvancedQuantizationParameters(
        activations_range_estimator_params=estimator,
        weights_quantization_params=None if options.per_channel else QuantizationParameters(per_channel=False),
        backend_params={BackendParameters.COMPRESS_WEIGHTS: fold_weights},
    )
    ignored = _ignored_scope(nncf, model, options.exclude_nodes, method)
    try:
        quantized = nncf.quantize(
            model,
            _dataset(nncf, images, job.input_name),
            preset=nncf.QuantizationPreset(_PRESET),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(images),
            ignored_scope=ignored,
            advanced_parameters=advanced,
        )
    except Exception as exc:
        raise QuantizationError(f"{method}: nncf.quantize failed: {one_line(exc)}") from exc
    return quantized, estimator_name


def int8_static(job: QuantJob) -> MethodResult:
    """NNCF post-training int8 (transformer model type, mixed preset), calibrated on ``job.calibration``.

    Options: ``calibrate_method`` (minmax: NNCF's mean min/max; percentile:
    mean quantiles; entropy: NNCF's histogram estimator), ``per_channel``
    (weight scales), ``exclude_nodes`` (OpenVINO op names kept in float).
    """
    method = "int8-static"
    images = _batch(job.calibration, method, "calibration")
    with _quiet_nncf() as nncf:
        model = _read(job, method)
        quantized, estimator = _quantize(nncf, model, job, images, method, fold_weights=True)
        _save(quantized, job, method)
    return MethodResult(_KIND, _ENTRY, _FILES, "int8", {
        "method": method,
        "bits": 8,
        "preset": _PRESET,
        "model_type": "transformer",
        "activations": "int8 (FakeQuantize)",
        "weights": "int8 per-channel" if job.options.per_channel else "int8 per-tensor",
        "range_estimator": estimator,
        "subset_size": len(images),
        "exclude_nodes": list(job.options.exclude_nodes),
        "inference_precision_hint": "f32",
        **_versions(nncf),
    })


def _weight_ops(model: Any) -> list[str]:
    """MatMuls with a constant operand and embedding Gathers: the ops weight compression
    covers (as optimum-intel's ``_collect_ops_with_weights``)."""
    def constant(port: Any) -> bool:
        node = port.get_node()
        while node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    names = []
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "MatMul" and (constant(op.input_value(0)) or constant(op.input_value(1))):
            names.append(op.get_friendly_name())
        elif kind == "Gather" and op.input_value(0).get_element_type().is_real() and constant(op.input_value(0)):
            names.append(op.get_friendly_name())
    return names


def _hybrid(nncf: Any, model: Any, job: QuantJob, feeds: list[dict[str, np.ndarray]], method: str,
            *, fold_weights: bool) -> tuple[Any, int]:
    """optimum-intel's hybrid mode: int8 weight compression of every MatMul and embedding
    (convolutions left to the second pass), then ``nncf.quantize`` of what remains
    (convolutions with their weights, the activations of the other ops) with the weighted
    ops ignored, transformer model type, SmoothQuant off. Returns the model and how many
    ops were weight-compressed."""
    from nncf.openvino.quantization.backend_parameters import BackendParameters
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters

    weighted = _weight_ops(model)
    has_conv = any(op.get_type_name() == "Convolution" for op in model.get_ops())
    user = _ignored_scope(nncf, model, job.options.exclude_nodes, method)
    try:
        compressed = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT8_ASYM,
            ignored_scope=nncf.IgnoredScope(types=["Convolution"], names=list(job.options.exclude_nodes),
                                            validate=False) if has_conv or user else None)
    except Exception as exc:
        raise QuantizationError(f"{method}: nncf.compress_weights failed: {one_line(exc)}") from exc
    ignored = sorted(set(weighted) | set(job.options.exclude_nodes))
    advanced = nncf.AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1),
        backend_params={BackendParameters.COMPRESS_WEIGHTS: fold_weights},
    )
    try:
        quantized = nncf.quantize(
            compressed, _dataset(nncf, feeds, job.input_name), model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds), ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
            advanced_parameters=advanced,
        )
    except Exception as exc:
        raise QuantizationError(f"{method}: nncf.quantize failed: {one_line(exc)}") from exc
    return quantized, len(weighted)


def int8_hybrid(job: QuantJob) -> MethodResult:
    """Hybrid int8 for a diffusion denoiser (optimum-intel's ``_hybrid_quantization``):
    int8 weights for MatMuls and embeddings, int8 weights and activations for
    convolutions and activations elsewhere, calibrated on ``job.calibration`` (the
    denoiser's recorded feed dicts). Options: ``exclude_nodes`` (kept in float)."""
    method = "int8-hybrid"
    feeds = _feeds(job.calibration, method)
    if feeds is None:
        raise QuantizationError(f"{method} needs the denoiser's recorded feeds as calibration")
    with _quiet_nncf() as nncf:
        model = _read(job, method)
        quantized, compressed = _hybrid(nncf, model, job, feeds, method, fold_weights=True)
        _save(quantized, job, method)
    return MethodResult(_KIND, _ENTRY, _FILES, "int8", {
        "method": method,
        "bits": 8,
        "weights": "int8 asymmetric per-channel (MatMul, embeddings: weight compression); convolutions "
                   "int8 with their activations",
        "activations": "int8 (FakeQuantize) except at the weight-compressed ops",
        "model_type": "transformer",
        "smooth_quant": False,
        "weight_compressed_ops": compressed,
        "subset_size": len(feeds),
        "exclude_nodes": list(job.options.exclude_nodes),
        "recipe": "optimum-intel hybrid quantization",
        "inference_precision_hint": "f32",
        **_versions(nncf),
    })


def fp32(job: QuantJob) -> MethodResult:
    """The float model as IR, weights as they are (a pipeline component left unquantized)."""
    method = "fp32"
    _save(_read(job, method), job, method)
    return MethodResult(_KIND, _ENTRY, _FILES, "fp32", {"method": method, "library": "openvino",
                                                        **_versions(None)})


def _compress(nncf: Any, job: QuantJob, method: str, **kwargs: Any) -> None:
    model = _read(job, method)
    ignored = _ignored_scope(nncf, model, job.options.exclude_nodes, method)
    try:
        compressed = nncf.compress_weights(model, ignored_scope=ignored, **kwargs)
    except nncf.InvalidGroupSizeError as exc:
        # NNCF lists every failing layer on its own line: name the first one.
        failed = [ln.strip() for ln in str(exc).splitlines() if "(channel size:" in ln]
        example = f" (e.g. {failed[0]})" if failed else ""
        raise QuantizationError(
            f"{method}: group_size {kwargs.get('group_size')} does not divide the input channels of "
            f"{len(failed) or 'some'} layer(s){example}; use a divisor of them, or -1 for per-channel"
        ) from exc
    except Exception as exc:
        raise QuantizationError(f"{method}: nncf.compress_weights failed: {one_line(exc)}") from exc
    _save(compressed, job, method)


def int8_weight(job: QuantJob) -> MethodResult:
    """NNCF int8 weight compression: weights int8 per output channel with a zero point, activations float.

    Asymmetric (NNCF's default) rather than symmetric: the zero point uses all
    256 levels on skewed weight rows for the same storage, and OpenVINO's
    CPU and GPU kernels fold it into the weight decompression. Options:
    ``exclude_nodes``. Calibration is not used.
    """
    method = "int8-weight"
    with _quiet_nncf() as nncf:
        _compress(nncf, job, method, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return MethodResult(_KIND, _ENTRY, _FILES, "int8", {
        "method": method,
        "bits": 8,
        "mode": "int8_asym",
        "weights": "int8 per-channel, asymmetric",
        "activations": "float",
        "exclude_nodes": list(job.options.exclude_nodes),
        "inference_precision_hint": "default",
        **_versions(nncf),
    })


def _check_int4(options: QuantOptions) -> None:
    g, r = options.group_size, options.ratio
    if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0):
        raise QuantizationError(f"int4-weight: group_size must be a positive integer or -1 (per-channel), got {g!r}")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r <= 1.0):
        raise QuantizationError(f"int4-weight: ratio must be in (0, 1] (the int4 share of weights), got {r!r}")


def int4_weight(job: QuantJob) -> MethodResult:
    """NNCF int4 weight compression: INT4_SYM (``symmetric``) or INT4_ASYM, in groups of ``group_size``.

    ``ratio`` is the int4 share of the MatMul weights, the rest int8;
    convolutions, embeddings and the last MatMul always stay int8 (NNCF's
    default). Which MatMuls get int4 is decided data-free (weight quantization
    error) unless ``ratio < 1`` and calibration images are given, when NNCF
    ranks them by activation variance.
    ``group_size`` must divide the input channels of every int4 layer
    (-1: one scale per output channel). Options: ``exclude_nodes`` too.
    """
    method = "int4-weight"
    options = job.options
    _check_int4(options)
    data_aware = options.ratio < 1 and job.calibration is not None
    images = _batch(job.calibration, method, "calibration") if data_aware else None
    with _quiet_nncf() as nncf:
        mode = nncf.CompressWeightsMode.INT4_SYM if options.symmetric else nncf.CompressWeightsMode.INT4_ASYM
        data: dict[str, Any] = {}
        if images is not None:
            data = {"dataset": _dataset(nncf, images, job.input_name), "subset_size": len(images)}
        _compress(nncf, job, method, mode=mode, group_size=options.group_size, ratio=float(options.ratio), **data)
    return MethodResult(_KIND, _ENTRY, _FILES, "int4", {
        "method": method,
        "bits": 4,
        "mode": mode.value,
        "group_size": options.group_size,
        "granularity": "per-channel" if options.group_size == -1 else f"groups of {options.group_size}",
        "symmetric": options.symmetric,
        "ratio": float(options.ratio),
        "backup": "int8_asym (convolutions, embeddings, the last layer, and the 1 - ratio share)",
        "mixed_precision_metric": "max_activation_variance" if images is not None else "weight_quantization_error",
        "subset_size": len(images) if images is not None else 0,
        "activations": "float",
        "exclude_nodes": list(options.exclude_nodes),
        "inference_precision_hint": "default",
        **_versions(nncf),
    })


def fp16(job: QuantJob) -> MethodResult:
    """fp16 weights in the IR (``ov.save_model(compress_to_fp16=True)``).

    The IR keeps f32 inputs and outputs; the weights are upcast at load, and
    the compute precision is the runner's inference precision hint.
    """
    method = "fp16"
    model = _read(job, method)
    _save(model, job, method, fp16=True)
    return MethodResult(_KIND, _ENTRY, _FILES, "fp16", {
        "method": method,
        "bits": 16,
        "weights": "fp16 constants (compress_to_fp16)",
        "activations": "float (the runner's inference precision)",
        "inference_precision_hint": "default",
        "library": "openvino",
        **_versions(None),
    })


# --------------------------------------------------------------------------- sensitivity


def _float_twin(out: Any, factories: dict[str, Any], memo: dict[int, Any]) -> Any:
    """The float value of ``out``: FakeQuantize bypassed, and data movement
    downstream of one redone on the bypassed value. None if ``out`` carries no
    quantization noise."""
    node = out.get_node()
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return node.input_value(0)
    if kind not in _DATA_MOVEMENT:
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
        if kind in _NO_VALUE or kind in _DATA_MOVEMENT or node.get_output_size() == 0:
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
    feeds = _feeds(job.calibration, method)
    images = feeds if feeds is not None else _batch(job.calibration, method, "calibration")
    dicts = _feeds(eval_inputs, method)
    inputs: Any = dicts if dicts is not None else _batch(eval_inputs, method, "eval_inputs")
    with _quiet_nncf() as nncf:
        model = _read(job, method)
        if hybrid:  # the denoiser's hybrid recipe; ``exclude_nodes`` go to its quantize pass
            if feeds is None:
                raise QuantizationError(f"{method}: hybrid ranking needs feed dicts as calibration")
            quantized, _ = _hybrid(nncf, model, job, feeds, method, fold_weights=False)
        else:
            quantized, _ = _quantize(nncf, model, job, images, method, fold_weights=False)
        ov = _openvino()
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
