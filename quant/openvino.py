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

The NNCF calls themselves are in :mod:`enginekit.quant.openvino_nncf`, the
ranking in :mod:`enginekit.quant.openvino_sensitivity`.

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

from typing import Any

from enginekit.errors import QuantizationError
from enginekit.quant.base import MethodResult, QuantJob, QuantOptions
from enginekit.quant.openvino_nncf import (
    ENTRY,
    FILES,
    KIND,
    PRESET,
    compress,
    feed_dicts,
    image_batch,
    nncf_dataset,
    quantize_hybrid,
    quantize_int8,
    quiet_nncf,
    read_model,
    save_ir,
    versions,
)
from enginekit.quant.openvino_sensitivity import sensitivity

__all__ = ["int8_static", "int8_weight", "int4_weight", "int8_hybrid", "fp16", "fp32", "sensitivity"]


def int8_static(job: QuantJob) -> MethodResult:
    """NNCF post-training int8 (transformer model type, mixed preset), calibrated on ``job.calibration``.

    Options: ``calibrate_method`` (minmax: NNCF's mean min/max; percentile:
    mean quantiles; entropy: NNCF's histogram estimator), ``per_channel``
    (weight scales), ``exclude_nodes`` (OpenVINO op names kept in float).
    """
    method = "int8-static"
    images = image_batch(job.calibration, method, "calibration")
    with quiet_nncf() as nncf:
        model = read_model(job, method)
        quantized, estimator = quantize_int8(nncf, model, job, images, method, fold_weights=True)
        save_ir(quantized, job, method)
    return MethodResult(KIND, ENTRY, FILES, "int8", {
        "method": method,
        "bits": 8,
        "preset": PRESET,
        "model_type": "transformer",
        "activations": "int8 (FakeQuantize)",
        "weights": "int8 per-channel" if job.options.per_channel else "int8 per-tensor",
        "range_estimator": estimator,
        "subset_size": len(images),
        "exclude_nodes": list(job.options.exclude_nodes),
        "inference_precision_hint": "f32",
        **versions(nncf),
    })


def int8_hybrid(job: QuantJob) -> MethodResult:
    """Hybrid int8 for a diffusion denoiser (optimum-intel's ``_hybrid_quantization``):
    int8 weights for MatMuls and embeddings, int8 weights and activations for
    convolutions and activations elsewhere, calibrated on ``job.calibration`` (the
    denoiser's recorded feed dicts). Options: ``exclude_nodes`` (kept in float)."""
    method = "int8-hybrid"
    feeds = feed_dicts(job.calibration, method)
    if feeds is None:
        raise QuantizationError(f"{method} needs the denoiser's recorded feeds as calibration")
    with quiet_nncf() as nncf:
        model = read_model(job, method)
        quantized, compressed = quantize_hybrid(nncf, model, job, feeds, method, fold_weights=True)
        save_ir(quantized, job, method)
    return MethodResult(KIND, ENTRY, FILES, "int8", {
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
        **versions(nncf),
    })


def fp32(job: QuantJob) -> MethodResult:
    """The float model as IR, weights as they are (a pipeline component left unquantized)."""
    method = "fp32"
    save_ir(read_model(job, method), job, method)
    return MethodResult(KIND, ENTRY, FILES, "fp32", {"method": method, "library": "openvino",
                                                        **versions(None)})


def int8_weight(job: QuantJob) -> MethodResult:
    """NNCF int8 weight compression: weights int8 per output channel with a zero point, activations float.

    Asymmetric (NNCF's default) rather than symmetric: the zero point uses all
    256 levels on skewed weight rows for the same storage, and OpenVINO's
    CPU and GPU kernels fold it into the weight decompression. Options:
    ``exclude_nodes``. Calibration is not used.
    """
    method = "int8-weight"
    with quiet_nncf() as nncf:
        compress(nncf, job, method, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return MethodResult(KIND, ENTRY, FILES, "int8", {
        "method": method,
        "bits": 8,
        "mode": "int8_asym",
        "weights": "int8 per-channel, asymmetric",
        "activations": "float",
        "exclude_nodes": list(job.options.exclude_nodes),
        "inference_precision_hint": "default",
        **versions(nncf),
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
    ranks them by activation variance. ``awq`` (activation-aware scales folded into the
    layer before, where NNCF finds its patterns: an activation or a Multiply feeding a
    MatMul) and ``scale_estimation`` (per-group scales that minimise the layer's output
    error) calibrate on ``job.calibration``: images, or a pipeline's recorded feed dicts.
    ``group_size`` is adjusted down per layer where it does not divide the input channels
    (-1: one scale per output channel). Options: ``exclude_nodes`` too.
    """
    method = "int4-weight"
    options = job.options
    _check_int4(options)
    corrections = options.awq or options.scale_estimation
    if corrections and job.calibration is None:
        raise QuantizationError(f"{method}: AWQ and scale estimation calibrate on data; none was given")
    data_aware = (options.ratio < 1 or corrections) and job.calibration is not None
    images: Any = None
    if data_aware:  # images (a classifier) or recorded feed dicts (a pipeline's denoiser)
        images = feed_dicts(job.calibration, method)
        images = image_batch(job.calibration, method, "calibration") if images is None else images
    with quiet_nncf() as nncf:
        mode = nncf.CompressWeightsMode.INT4_SYM if options.symmetric else nncf.CompressWeightsMode.INT4_ASYM
        data: dict[str, Any] = {}
        if images is not None:
            data = {"dataset": nncf_dataset(nncf, images, job.input_name), "subset_size": len(images)}
        if corrections:
            # None, not False, where not asked: NNCF reads None as "its default" (off for these two).
            data.update(awq=True if options.awq else None, scale_estimation=True if options.scale_estimation else None)
        if options.group_size > 0:
            # A layer whose input channels the group size does not divide (SD 1.5's 320) takes the
            # largest power of two that does (>= 16), else int8: NNCF's ADJUST, not a failed build.
            data["advanced_parameters"] = nncf.AdvancedCompressionParameters(
                group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST, min_adjusted_group_size=16)
        model = compress(nncf, job, method, mode=mode, group_size=options.group_size, ratio=float(options.ratio),
                         **data)
    # AWQ's scales go into a Multiply before each layer it found (NNCF names them .../awq_mul) unless they
    # fold into a preceding weight; none where the model has no pattern for it (a ViT's GELU is none).
    awq_ops = sum(op.get_type_name() == "Multiply" and "awq_mul" in op.get_friendly_name()
                  for op in model.get_ops()) if options.awq else 0
    return MethodResult(KIND, ENTRY, FILES, "int4", {
        "method": method,
        "bits": 4,
        "mode": mode.value,
        "group_size": options.group_size,
        "granularity": "per-channel" if options.group_size == -1 else f"groups of {options.group_size}",
        "group_size_fallback": None if options.group_size == -1 else (
            "adjust: a layer whose input channels the group size does not divide takes the largest power of "
            "two below it that does (>= 16), else int8 (NNCF GroupSizeFallbackMode.ADJUST)"),
        "symmetric": options.symmetric,
        "ratio": float(options.ratio),
        "backup": "int8_asym (convolutions, embeddings, the last layer, and the 1 - ratio share)",
        "mixed_precision_metric": ("max_activation_variance" if images is not None and options.ratio < 1
                                   else "weight_quantization_error"),
        "awq": options.awq,
        **({"awq_multiplies": awq_ops} if options.awq else {}),
        "scale_estimation": options.scale_estimation,
        "subset_size": len(images) if images is not None else 0,
        "activations": "float",
        "exclude_nodes": list(options.exclude_nodes),
        "inference_precision_hint": "default",
        **versions(nncf),
    })


def fp16(job: QuantJob) -> MethodResult:
    """fp16 weights in the IR (``ov.save_model(compress_to_fp16=True)``).

    The IR keeps f32 inputs and outputs; the weights are upcast at load, and
    the compute precision is the runner's inference precision hint.
    """
    method = "fp16"
    model = read_model(job, method)
    save_ir(model, job, method, fp16=True)
    return MethodResult(KIND, ENTRY, FILES, "fp16", {
        "method": method,
        "bits": 16,
        "weights": "fp16 constants (compress_to_fp16)",
        "activations": "float (the runner's inference precision)",
        "inference_precision_hint": "default",
        "library": "openvino",
        **versions(None),
    })
