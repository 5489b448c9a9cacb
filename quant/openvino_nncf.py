"""The NNCF and OpenVINO plumbing the OpenVINO methods share: reading the float ONNX
model, writing the IR, calibration datasets, and the ``nncf.quantize`` /
``nncf.compress_weights`` calls with our options (int8, the hybrid diffusion recipe,
weight compression), each failure a one-line QuantizationError.
"""

from __future__ import annotations

import contextlib
import logging
from importlib import metadata
from typing import Any, Iterator

import numpy as np

from enginekit.errors import QuantizationError, one_line
from enginekit.quant.base import QuantJob

KIND = "openvino"
ENTRY = "model.xml"
FILES = ("model.xml", "model.bin")
#: NNCF's preset for transformers: symmetric weights, asymmetric activations
#: (post-GELU and post-LayerNorm activations are far from zero-centred).
PRESET = "mixed"


def openvino_module() -> Any:
    try:
        import openvino as ov
    except ImportError as exc:
        raise QuantizationError("openvino quantization needs openvino: pip install 'enginekit[openvino]'") from exc
    return ov


def versions(nncf: Any | None) -> dict[str, str]:
    ov = openvino_module()
    try:
        ov_version = metadata.version("openvino")
    except metadata.PackageNotFoundError:
        ov_version = str(ov.__version__)
    out = {"openvino_version": ov_version}
    if nncf is not None:
        out = {"library": "nncf", "nncf_version": str(nncf.__version__), **out}
    return out


@contextlib.contextmanager
def quiet_nncf() -> Iterator[Any]:
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


def read_model(job: QuantJob, method: str) -> Any:
    """The float model, converted from ONNX, with ``job.input_name`` checked."""
    ov = openvino_module()
    try:
        model = ov.convert_model(str(job.model))
    except Exception as exc:
        raise QuantizationError(f"{method}: openvino could not convert {job.model.name}: {one_line(exc)}") from exc
    names = set().union(*(p.get_names() for p in model.inputs))
    if job.input_name not in names:
        have = ", ".join(sorted(names))
        raise QuantizationError(f"{method}: the model has no input {job.input_name!r} (inputs: {have})")
    return model


def save_ir(model: Any, job: QuantJob, method: str, *, fp16: bool = False) -> None:
    ov = openvino_module()
    try:
        job.out_dir.mkdir(parents=True, exist_ok=True)
        # compress_to_fp16 defaults to True in save_model: only the fp16 method wants it.
        ov.save_model(model, str(job.out_dir / ENTRY), compress_to_fp16=fp16)
    except Exception as exc:
        raise QuantizationError(f"{method}: could not write the IR to {job.out_dir}: {one_line(exc)}") from exc


def image_batch(x: np.ndarray | None, method: str, what: str) -> np.ndarray:
    """``x`` as a float32 (N, C, H, W) batch, N >= 1, or a QuantizationError."""
    if x is None:
        raise QuantizationError(f"{method} needs {what} (N, 3, H, W) float32 images; none were given")
    arr = np.asarray(x)
    if arr.ndim != 4 or len(arr) == 0 or not np.issubdtype(arr.dtype, np.floating):
        raise QuantizationError(
            f"{method}: {what} must be a non-empty (N, C, H, W) float array, got {arr.dtype} {arr.shape}"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def feed_dicts(x: Any, method: str) -> list[dict[str, np.ndarray]] | None:
    """``x`` as a list of feed dicts when it is one (a pipeline's recorded denoiser inputs), else None."""
    if not isinstance(x, (list, tuple)):
        return None
    if not x or not all(isinstance(d, dict) for d in x):
        raise QuantizationError(f"{method}: calibration feeds must be a non-empty list of {{input: array}} dicts")
    return [dict(d) for d in x]


def nncf_dataset(nncf: Any, images: Any, input_name: str) -> Any:
    if isinstance(images, list):  # feed dicts, each one model call
        return nncf.Dataset(images)
    # One sample per item, batch 1: NNCF counts items for subset_size, and
    # per-sample statistics are what its range estimators average over.
    return nncf.Dataset(list(images), lambda x: {input_name: x[None]})


def ignored_scope(nncf: Any, model: Any, exclude: tuple[str, ...], method: str) -> Any:
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


def range_estimator(calibrate_method: str, method: str) -> tuple[str, Any]:
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


def quantize_int8(
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
    estimator_name, estimator = range_estimator(options.calibrate_method, method)
    advanced = nncf.AdvancedQuantizationParameters(
        activations_range_estimator_params=estimator,
        weights_quantization_params=None if options.per_channel else QuantizationParameters(per_channel=False),
        backend_params={BackendParameters.COMPRESS_WEIGHTS: fold_weights},
    )
    ignored = ignored_scope(nncf, model, options.exclude_nodes, method)
    try:
        quantized = nncf.quantize(
            model,
            nncf_dataset(nncf, images, job.input_name),
            preset=nncf.QuantizationPreset(PRESET),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(images),
            ignored_scope=ignored,
            advanced_parameters=advanced,
        )
    except Exception as exc:
        raise QuantizationError(f"{method}: nncf.quantize failed: {one_line(exc)}") from exc
    return quantized, estimator_name


def weight_ops(model: Any) -> list[str]:
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


def quantize_hybrid(nncf: Any, model: Any, job: QuantJob, feeds: list[dict[str, np.ndarray]], method: str,
            *, fold_weights: bool) -> tuple[Any, int]:
    """optimum-intel's hybrid mode: int8 weight compression of every MatMul and embedding
    (convolutions left to the second pass), then ``nncf.quantize`` of what remains
    (convolutions with their weights, the activations of the other ops) with the weighted
    ops ignored, transformer model type, SmoothQuant off. Returns the model and how many
    ops were weight-compressed."""
    from nncf.openvino.quantization.backend_parameters import BackendParameters
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters

    weighted = weight_ops(model)
    has_conv = any(op.get_type_name() == "Convolution" for op in model.get_ops())
    user = ignored_scope(nncf, model, job.options.exclude_nodes, method)
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
            compressed, nncf_dataset(nncf, feeds, job.input_name), model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds), ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
            advanced_parameters=advanced,
        )
    except Exception as exc:
        raise QuantizationError(f"{method}: nncf.quantize failed: {one_line(exc)}") from exc
    return quantized, len(weighted)


def compress(nncf: Any, job: QuantJob, method: str, **kwargs: Any) -> Any:
    """``nncf.compress_weights`` of the job's model with ``kwargs``, written as IR; returns the model."""
    model = read_model(job, method)
    ignored = ignored_scope(nncf, model, job.options.exclude_nodes, method)
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
    save_ir(compressed, job, method)
    return compressed
