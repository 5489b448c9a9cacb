"""``quantize`` and ``evaluate``: a float ONNX artifact in, a gated quantized artifact out.

1. pick the method (backend × name) and the data: calibration inputs for static
   methods, held-out inputs for the gate (never the calibration samples);
2. run the method into a temporary folder and write its manifest;
3. load the result like any artifact and measure it against the float parent;
4. under budget: with ``auto_fallback``, rank layers by the error quantizing them
   causes and keep the worst in float, one group at a time, until the budget
   holds; otherwise fail, and nothing is written.
"""

from __future__ import annotations

import importlib
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from enginekit.api import load_runner
from enginekit.artifact import atomic_artifact, make_component, verify_artifact, write_manifest
from enginekit.errors import FidelityError, InputError, OptionError, QuantizationError
from enginekit.hardware import fingerprint
from enginekit.manifest import Manifest, read_manifest
from enginekit.quant.base import QuantJob, QuantMethod, QuantOptions, get_method, methods_for
from enginekit.quant.data import InputSet, describe_data, load_inputs, photos_available, split_every
from enginekit.quant.gate import Budget, check, measure, run_all
from enginekit.quant.vocabulary import TABLE, calibration_spec, check_data_aware, note, resolve
from enginekit.registry import backend_class, backend_for_kind, backend_names, expect_stage
from enginekit.stages import with_fields

__all__ = ["QuantizeRequest", "quantize_artifact", "evaluate_artifact", "quantize_classifier",
           "quantize_text_to_image", "DEFAULT_INT8", "default_int8_method", "default_calibration", "method_note"]

_CLASSIFIER_TASK = "image-classification"

#: ``--int8`` (``-m int8``): the int8 method each backend quantizes a classifier with, as the
#: vocabulary's table says. Pipelines: "int8" (the plan of :func:`enginekit.quant.diffusion.quantize_pipeline`).
DEFAULT_INT8: dict[str, str] = {b: r.method for (t, b, n), r in TABLE.items()
                                if t == _CLASSIFIER_TASK and n == "int8" and r.method}


def default_int8_method(backend: str) -> str:
    """What ``--int8`` means for a classifier on ``backend``: the vocabulary's ``int8``."""
    if backend not in DEFAULT_INT8:
        raise InputError(f"--int8 has no default method for {backend}; quantize first (enginekit quantize -m ...)")
    return DEFAULT_INT8[backend]


def _backend(options: Any) -> str:
    if options.target and options.backend and options.backend != options.target:
        raise OptionError(f"--target {options.target} and --backend {options.backend} disagree; give one")
    return options.target or options.backend or "onnxruntime"


def method_note(artifact: str | Path, options: Any) -> str:
    """The line a specific (old) method name prints (what it is in the vocabulary), "" otherwise."""
    if not options.method:
        return ""
    return note(read_manifest(artifact).task, _backend(options), str(options.method))


def default_calibration(parent: Manifest) -> str:
    """The calibration (and held-out) data when none is given: the built-in digits for the
    built-in model, crops of real photos otherwise."""
    return "builtin" if parent.provenance.get("source") == "default" else "photos"

_SENSITIVITY = {"onnxruntime": "enginekit.quant.ort", "tensorrt": "enginekit.quant.ort", "openvino": "enginekit.quant.openvino"}


class _Missed(FidelityError):
    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def _datasets(
    parent: Manifest, method: QuantMethod, calibration: str | None, eval_data: str | None,
    calibration_size: int, eval_size: int, allow_synthetic: bool,
) -> tuple[InputSet | None, InputSet]:
    """(calibration set, held-out set) for ``method``; the two never share samples."""
    if method.needs_calibration and calibration is None:
        raise InputError(
            f"{method.name} on {method.backend} needs calibration data: --calibration FOLDER|FILE.npy|builtin"
        )
    calib: InputSet | None = None
    held: InputSet | None = None
    if calibration is not None:
        if calibration in ("builtin", "synthetic", "photos", "patterns"):
            calib = load_inputs(calibration, parent, purpose="calibration", limit=calibration_size,
                                allow_synthetic=allow_synthetic or not method.needs_calibration)
            if eval_data is None:
                held = load_inputs(calibration, parent, purpose="evaluation", limit=eval_size, seed=1)
        else:
            full = load_inputs(calibration, parent, purpose="calibration")
            if eval_data is None:
                calib, held = split_every(full)
                held = held.take(range(min(eval_size, held.size)))
            else:
                calib = full
            calib = calib.take(range(min(calibration_size, calib.size)))
    if eval_data is not None:
        held = load_inputs(eval_data, parent, purpose="evaluation", limit=eval_size, seed=1)
    if held is None:
        # Judge on real images where they can be had: seeded noise gives near-tied logits
        # that say little about an engine (and is named as noise wherever it is reported).
        default = default_calibration(parent)
        if default == "photos" and not photos_available():
            default = "synthetic"
        held = load_inputs(default, parent, purpose="evaluation", limit=eval_size, seed=1)
    return (calib if method.needs_calibration else None), held


@dataclass(frozen=True)
class QuantizeRequest:
    """What :func:`quantize_artifact` is asked, beside the artifact, the output and the method."""

    backend: str = "onnxruntime"
    #: Calibration inputs (static methods) and held-out inputs for the gate: data specs.
    calibration: str | None = None
    eval_data: str | None = None
    #: The quantizer's own settings (per-channel, group size, nodes kept in float, ...).
    options: QuantOptions = QuantOptions()
    #: The fidelity budget against the float parent; None: the method's own.
    min_agreement: float | None = None
    min_cosine: float | None = None
    #: Keep the layers that cost the most in float, group by group, until the budget holds.
    auto_fallback: bool = False
    allow_synthetic_calibration: bool = False
    calibration_size: int = 64
    eval_size: int = 64
    overwrite: bool = False
    #: False: no gate (the caller judges the result against another reference).
    check_fidelity: bool = True


def quantize_artifact(artifact: str | Path, out_dir: str | Path, method: str, request: QuantizeRequest | None = None,
                      *, on_step: Callable[[str], None] = lambda msg: None, **fields: Any) -> Manifest:
    """Quantize the float ONNX ``artifact`` with ``method`` for ``request.backend`` into ``out_dir``.
    ``request`` says what is asked (:class:`QuantizeRequest`); its fields may also be given by
    name (``backend="openvino"``), over ``request``.

    Raises :class:`FidelityError` (and writes nothing) when the result misses
    its budget against the float parent on held-out inputs. ``check_fidelity=False``
    is for callers that judge the result themselves against another reference
    (``optimize`` measures every engine against PyTorch): no gate runs and the
    manifest's ``fidelity`` stays empty.
    """
    req = with_fields(QuantizeRequest, request, fields)
    root = Path(artifact)
    parent = read_manifest(root)
    verify_artifact(root, parent)
    expect_stage(parent.task, "quantize", f"{__name__}:quantize_classifier")
    if parent.kind != "onnx" or parent.quantization:
        raise QuantizationError(f"{root}: quantize takes a float ONNX artifact (from export), this one is "
                                f"{parent.kind}{' ' + parent.quantization.get('method', '') if parent.quantization else ''}")
    spec = get_method(resolve(parent.task, req.backend, method).method, req.backend)
    data_aware = req.options.awq or req.options.scale_estimation
    if data_aware and not spec.data_aware:
        raise QuantizationError(f"AWQ and scale estimation run in NNCF's int4 weight compression on openvino, "
                                f"not {spec.name} on {spec.backend}")
    if req.auto_fallback and not spec.needs_calibration:
        raise QuantizationError(f"--auto-fallback applies to calibrated int8 methods, not {method}")
    budget = Budget(spec.min_agreement if req.min_agreement is None else req.min_agreement,
                    spec.min_cosine if req.min_cosine is None else req.min_cosine)
    on_step("preparing calibration and held-out data")
    calib, held = _datasets(parent, replace(spec, needs_calibration=spec.needs_calibration or data_aware),
                            req.calibration, req.eval_data, req.calibration_size, req.eval_size,
                            req.allow_synthetic_calibration)
    reference: dict[str, Any] = {}
    if req.check_fidelity:
        on_step(f"running the float parent on {describe_data(held.source, held.size)}")
        parent_runner, _ = load_runner(root, device="cpu", backend="onnxruntime")
        with parent_runner:
            reference = run_all(parent_runner, held)

    def attempt(opts: QuantOptions, fallback: list[dict[str, Any]] | None) -> Manifest:
        with atomic_artifact(out_dir, overwrite=req.overwrite, inputs=(root,)) as tmp:
            on_step(f"{spec.name} ({spec.backend})" + (f", {len(opts.exclude_nodes)} nodes kept in float" if opts.exclude_nodes else ""))
            comp = parent.component()
            result = spec.load()(QuantJob(root / comp.entry, tmp, comp.inputs[0].name,
                                          None if calib is None else calib.inputs, opts))
            manifest = _manifest(root, parent, spec, result, tmp, calib, opts, fallback, asked=method)
            write_manifest(tmp, manifest)
            if not req.check_fidelity:
                return manifest
            on_step(f"measuring against the float parent on {describe_data(held.source, held.size)}")
            runner, _ = load_runner(tmp, device="cpu")
            with runner:
                report = measure(reference, runner, held, parent.labels)
            manifest = manifest.replace(fidelity={"reference": "float parent", **report,
                                                  "budget": budget.to_dict()})
            write_manifest(tmp, manifest)
            try:
                check(report, budget, f"{spec.name} ({spec.backend})")
            except FidelityError as exc:
                raise _Missed(str(exc), report) from None
        return manifest

    try:
        return attempt(req.options, None)
    except _Missed as first:
        if not req.auto_fallback:
            raise FidelityError(f"{first}. {_what_to_try(spec, calib, budget)}") from None
        return _fallback(spec, root, parent, calib, held, req.options, attempt, first.report, on_step)


def _what_to_try(spec: QuantMethod, calib: InputSet | None, budget: Budget) -> str:
    """The next things to try after a missed gate, in the order that usually helps."""
    tries = []
    if calib is not None:
        tries.append(f"more or closer calibration data (it had {describe_data(calib.source, calib.size)}; "
                     "-c FOLDER of images like the ones it will see, --calibration-size)")
        tries.append("--auto-fallback (keeps the layers that hurt most in float until the budget holds)")
    if spec.name.startswith("int4"):
        tries.append("smaller int4 groups (--group-size 32)" + (", or part of the weights in int8 (--ratio 0.8)"
                                                                 if spec.data_aware else ""))
    # the backend's uncalibrated int8 (ONNX Runtime's dynamic int8, NNCF's weight-only int8)
    weight_only = next((m.name for m in methods_for(spec.backend)
                        if m.name.startswith("int8") and not m.needs_calibration), None)
    tries.append("fp16/bf16" if weight_only in (None, spec.name) else
                 f"a method that needs no calibration: {weight_only}, or fp16/bf16")
    tries.append(f"a weaker budget, if the numbers above are good enough for you (--min-agreement, now "
                 f"{budget.min_agreement:g}; --min-cosine, now {budget.min_cosine:g})")
    return "To try: " + "; ".join(tries)


def _fallback(spec: QuantMethod, root: Path, parent: Manifest, calib: InputSet | None, held: InputSet,
              options: QuantOptions, attempt: Callable[..., Manifest], first: dict[str, Any],
              on_step: Callable[[str], None]) -> Manifest:
    assert calib is not None  # calibrated methods only, checked by the caller
    on_step("ranking layers by the error quantizing them causes")
    module = importlib.import_module(_SENSITIVITY[spec.backend])
    comp = parent.component()
    probe = calib.take(range(min(16, calib.size)))
    with tempfile.TemporaryDirectory(prefix="enginekit-sensitivity-") as scratch:
        ranking = module.sensitivity(QuantJob(root / comp.entry, Path(scratch), comp.inputs[0].name,
                                              calib.inputs, options), probe.inputs)
    if not ranking:
        raise QuantizationError(f"{spec.name}: no quantized layers to keep in float")
    group = max(1, math.ceil(len(ranking) / 10))
    steps: list[dict[str, Any]] = [{"excluded": 0, "top1_agreement": first["top1_agreement"],
                                    "logits_cosine": first["logits_cosine"]}]
    excluded: list[str] = list(options.exclude_nodes)
    for start in range(0, len(ranking), group):
        excluded += [name for name, _ in ranking[start : start + group]]
        try:
            return attempt(replace(options, exclude_nodes=tuple(excluded)), steps)
        except _Missed as miss:
            steps.append({"excluded": len(excluded), "top1_agreement": miss.report["top1_agreement"],
                          "logits_cosine": miss.report["logits_cosine"]})
    raise FidelityError(
        f"{spec.name} ({spec.backend}) misses its budget even with all {len(ranking)} quantized layers kept in "
        f"float (best cosine {max(s['logits_cosine'] for s in steps):.5f}); nothing was written"
    )


def _manifest(root: Path, parent: Manifest, spec: QuantMethod, result: Any, tmp: Path, calib: InputSet | None,
              opts: QuantOptions, fallback: list[dict[str, Any]] | None, asked: str) -> Manifest:
    comp = parent.component()
    component = make_component(tmp, comp.name, result.entry, result.files, comp.inputs, comp.outputs, result.precision)
    quantization: dict[str, Any] = {"method": spec.name, "backend": spec.backend, **result.details,
                                    "asked": asked}
    if calib is not None:
        quantization["calibration"] = {**calib.record(), "method": opts.calibrate_method}
    if opts.exclude_nodes:
        quantization["excluded_nodes"] = list(opts.exclude_nodes)
    if fallback is not None:
        quantization["fallback"] = {"steps": fallback, "excluded": len(opts.exclude_nodes)}
    runtime = backend_for_kind(result.kind)
    if runtime is None and spec.backend in backend_names():
        runtime = backend_class(spec.backend)
    if runtime is not None:  # the backend that runs the result says what its target holds
        target = runtime.quantized_target(result.details)
    else:  # a quantization target no runtime here runs (TensorRT): the gate ran on the default backend
        target = {"backend": spec.backend, "precision": result.precision.split("-")[0],
                  "validated_on": "onnxruntime cpu"}
    provenance = {**parent.provenance,
                  "parent": {"path": str(root.resolve()), "manifest_sha256": parent.digest(), "kind": parent.kind},
                  "host": fingerprint()}
    return parent.replace(kind=result.kind, components={comp.name: component}, quantization=quantization,
                          target=target, provenance=provenance, fidelity={})


def evaluate_artifact(artifact: str | Path, data: str | None = None, limit: int | None = None,
                      device: str = "cpu") -> dict[str, Any]:
    """Accuracy (when ``data`` is labelled) and agreement with the float parent, if it is still on disk."""
    root = Path(artifact)
    expect_stage(read_manifest(root).task, "evaluate", f"{__name__}:evaluate_artifact")
    runner, manifest = load_runner(root, device=device)
    spec = data or ("builtin" if manifest.provenance.get("source") == "default" else None)
    if spec is None:
        runner.close()
        raise InputError("give --data: a folder of images, one sub-folder per class, or an .npy file")
    held = load_inputs(spec, manifest, purpose="evaluation", limit=limit)
    parent_info = manifest.provenance.get("parent") or {}
    parent_path = Path(parent_info["path"]) if parent_info.get("path") else None
    with runner:
        if parent_path is not None and (parent_path / "manifest.json").is_file():
            parent_runner, _ = load_runner(parent_path, device="cpu", backend="onnxruntime")
            with parent_runner:
                report = measure(parent_runner, runner, held, manifest.labels)
            report["reference"] = str(parent_path)
        else:
            out = run_all(runner, held)
            report = {"inputs": held.source, "samples": held.size, "reference": None}
            if held.labels is not None and manifest.labels is not None:
                report["accuracy"] = float(sum(manifest.labels[i] == t for i, t in zip(out["logits"].argmax(1), held.labels)) / held.size)
    report["artifact"] = str(root)
    report["method"] = (manifest.quantization or {}).get("method", "float")
    return report


_DATA_AWARE = ("dataset", "awq", "scale_estimation")
_CLASSIFIER = ("method", "int8", "fp16", "backend", "target", "calibration", "overwrite", "eval_data",
               "calibrate_method", "per_channel", "group_size", "symmetric", "ratio", "exclude", "min_agreement",
               "min_cosine", "auto_fallback", "allow_synthetic_calibration", "calibration_size", "eval_size",
               *_DATA_AWARE)
_PIPELINE = ("method", "int8", "fp16", "backend", "calibration", "overwrite", "group_size", "ratio", "auto_fallback",
             "components", "calibration_prompts", "calibration_steps", "min_psnr", "min_ssim", "symmetric",
             *_DATA_AWARE)


def _method(options: Any) -> str:
    """``method``, or the vocabulary's name ``--int8`` / ``--fp16`` stand for; exactly one of the three."""
    chosen = [options.flag(n) for n in ("method", "int8", "fp16") if getattr(options, n)]
    if len(chosen) != 1:
        raise InputError("give the quantization: -m METHOD, --int8 or --fp16" if not chosen
                         else f"{' and '.join(chosen)} disagree; give one")
    return "fp16" if options.fp16 else "int8" if options.int8 else str(options.method)


def _checked(task: str, backend: str, options: Any) -> tuple[str, str | None]:
    """(the method name, the calibration spec) of ``options``, with every vocabulary and
    data-aware check done before any work."""
    method = _method(options)
    resolve(task, backend, method)
    check_data_aware(task, backend, method, awq=bool(options.awq), scale_estimation=bool(options.scale_estimation),
                     dataset=options.dataset or options.calibration)
    return method, calibration_spec(task, options.calibration, options.dataset)


def quantize_classifier(artifact: str | Path, out: str | Path, options: Any, *,
                        on_step: Callable[[str], None] = lambda msg: None) -> Manifest:
    """``enginekit.stages.quantize`` of an image classifier: :func:`quantize_artifact`
    with the fields of ``options`` (a :class:`enginekit.stages.QuantizeOptions`) it takes."""
    from enginekit.stages import refuse

    refuse(options, _CLASSIFIER, lambda wrong: f"{', '.join(wrong)}: pipeline options; {artifact} is a classifier")
    backend = _backend(options)
    method, calibration = _checked(_CLASSIFIER_TASK, backend, options)
    if calibration is None and method == "int8" and get_method(default_int8_method(backend), backend).needs_calibration:
        calibration = default_calibration(read_manifest(artifact))
    quant = QuantOptions(**options.set(("calibrate_method", "per_channel", "group_size", "symmetric", "ratio", "awq",
                                        "scale_estimation")),
                         **({"exclude_nodes": tuple(options.exclude)} if options.exclude else {}))
    request = QuantizeRequest(backend=backend, calibration=calibration, options=quant,
                              **options.set(("eval_data", "min_agreement", "min_cosine", "auto_fallback",
                                             "allow_synthetic_calibration", "calibration_size", "eval_size",
                                             "overwrite")))
    return quantize_artifact(artifact, out, method, request, on_step=on_step)


def quantize_text_to_image(artifact: str | Path, out: str | Path, options: Any, *,
                           on_step: Callable[[str], None] = lambda msg: None) -> Manifest:
    """``enginekit.stages.quantize`` of a text-to-image pipeline:
    :func:`enginekit.quant.diffusion.quantize_pipeline` with the fields of ``options`` it takes."""
    from enginekit.quant.diffusion import PipelineQuantOptions, quantize_pipeline
    from enginekit.stages import refuse

    refuse(options, _PIPELINE, lambda wrong: f"{', '.join(wrong)}: classifier options; {artifact} is a text-to-image "
                                             "pipeline (it takes --component, --calibration PROMPTS.txt, "
                                             "--min-psnr, --min-ssim)")
    backend = options.backend or "onnxruntime"
    method, calibration = _checked("text-to-image", backend, options)
    pipeline = PipelineQuantOptions(backend=backend, calibration=None if calibration == "builtin" else calibration,
                                    **options.set(("components", "calibration_prompts", "calibration_steps",
                                                   "group_size", "ratio", "symmetric", "awq", "scale_estimation",
                                                   "min_psnr", "min_ssim", "auto_fallback", "overwrite")))
    return quantize_pipeline(artifact, out, method, pipeline, on_step=on_step)
