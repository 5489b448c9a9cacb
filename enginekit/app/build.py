"""``compile`` and ``generate`` as library calls the CLI makes: each one function."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from enginekit.api import compile_artifact, load
from enginekit.engine import CompileOptions
from enginekit.errors import InputError
from enginekit.manifest import MANIFEST_NAME, Manifest, read_manifest
from enginekit.outputs import check_output, write_file
from enginekit.registry import task_class
from enginekit.stages import with_fields

__all__ = ["COMPILE_FLAGS", "BuildRequest", "backend_flags", "build_engine", "generate_images", "output_paths"]


#: The typed ``compile`` flags: flag -> (the backend that takes it, its option key, what
#: users of that backend's own tools call it).
COMPILE_FLAGS: dict[str, tuple[str, str, str]] = {
    "hint": ("openvino", "performance_hint", "benchmark_app -hint"),
    "streams": ("openvino", "num_streams", "benchmark_app -nstreams"),
    "inference_precision": ("openvino", "inference_precision", "benchmark_app -infer_precision"),
    "graph_optimization_level": ("onnxruntime", "graph_optimization_level", "SessionOptions.graph_optimization_level"),
    "transformer_fusions": ("onnxruntime", "transformer_fusions", "onnxruntime.transformers.optimizer"),
    "provider": ("onnxruntime", "provider", "InferenceSession(providers=[...])"),
    "shapes": ("tensorrt", "shapes", "trtexec --minShapes/--optShapes/--maxShapes"),
    "workspace": ("tensorrt", "workspace_mib", "trtexec --memPoolSize=workspace:N"),
    "builder_optimization_level": ("tensorrt", "builder_optimization_level", "trtexec --builderOptimizationLevel"),
}
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def backend_flags(backend: str, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The backend options of the typed ``compile`` flags that were given (None: not given);
    a flag of another backend is a one-line :class:`InputError` naming the ones this takes."""
    out: dict[str, Any] = {}
    for name, value in flags.items():
        if value is None or value is False:
            continue
        owner, key, _ = COMPILE_FLAGS[name]
        if owner != backend:
            own = ", ".join(_flag(n) for n, (b, _, _) in COMPILE_FLAGS.items() if b == backend) or "none of them"
            raise InputError(f"{_flag(name)} is a {owner} option; --backend {backend} takes {own} "
                             "(and --batch, --threads, --option KEY=VALUE)")
        out[key] = value
    return out


@dataclass(frozen=True)
class BuildRequest:
    """What :func:`build_engine` is asked, beside the artifact, the backend and the output."""

    device: str = "cpu"
    #: Worker threads the engine may use; 0 lets the backend decide.
    threads: int = 0
    precision: str = "fp32"
    #: A size or batch makes the shapes static (where the task and backend take them).
    height: int | None = None
    width: int | None = None
    batch: int | None = None
    #: Backend option -> value (``--option``), over the task's defaults and ``flags``.
    options: Mapping[str, Any] | None = None
    #: The typed ``compile`` flags (see :data:`COMPILE_FLAGS`).
    flags: Mapping[str, Any] | None = None
    #: Quantize with the backend's default int8 method first, calibrated on ``calibration``.
    int8: bool = False
    #: Quantize to fp8 Q/DQ first (TensorRT: NVIDIA Model Optimizer), calibrated on ``calibration``.
    fp8: bool = False
    calibration: str | None = None
    overwrite: bool = False
    #: OpenVINO: write OpenVINO GenAI's (and optimum-intel's) folder layout, which
    #: ``openvino_genai.Text2ImagePipeline`` loads (see :mod:`enginekit.runtimes.openvino_genai`).
    genai: bool = False


def build_engine(artifact: str | Path, backend: str, out: str | Path, request: BuildRequest | None = None, *,
                 on_step: Callable[[str], Any] = lambda msg: None, **fields: Any) -> Manifest:
    """Compile ``artifact`` for ``backend`` with the task's defaults: the family's precision
    exceptions and, given a size or batch, static shapes; ``flags`` (the typed ``compile``
    flags, see :data:`COMPILE_FLAGS`) and ``options`` (backend option -> value) override them.
    ``request`` says what is asked (:class:`BuildRequest`); its fields may also be given by
    name (``device="cpu"``), over ``request``.

    ``int8=True`` first quantizes with the backend's default int8 method
    (:data:`DEFAULT_INT8`; static methods calibrate on ``calibration``, by default the
    built-in digits for the built-in model and ``photos`` otherwise), gated on fidelity
    as ``enginekit quantize`` is, and compiles the result."""
    req = with_fields(BuildRequest, request, fields)
    manifest = read_manifest(artifact)
    if req.genai:
        return _build_genai(artifact, backend, out, req, on_step)
    cls = task_class(manifest.task)
    extra = dict(cls.compile_options(manifest, backend, req.precision, req.height, req.width, req.batch))
    typed = backend_flags(backend, req.flags or {})
    both = sorted(set(typed) & set(req.options or {}))
    if both:
        raise InputError(f"{both[0]} is given twice (a flag and --option {both[0]}=...); give it once")
    extra.update(typed)
    extra.update(req.options or {})
    device = req.device
    if device.lower() == "auto":
        from enginekit.api import resolve_device
        from enginekit.registry import get_backend

        device = resolve_device(get_backend(backend), device)
    compile_options = CompileOptions(device=device, threads=req.threads, extra=extra)
    if not (req.int8 or req.fp8):
        if req.calibration is not None:
            raise InputError("--calibration is for --int8 and --fp8 (static quantization calibrates on it)")
        return compile_artifact(artifact, backend, out, compile_options, overwrite=req.overwrite)
    flag = "--fp8" if req.fp8 else "--int8"
    if req.int8 and req.fp8:
        raise InputError("--int8 and --fp8 disagree; give one")
    if req.precision != "fp32":
        raise InputError(f"{flag} and --precision {req.precision} disagree; give one")
    from enginekit.stages import QuantizeOptions, quantize

    root = Path(artifact)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.int8-", dir=Path(out).parent) as scratch:
        asked = QuantizeOptions(method="fp8-qdq", backend=backend, calibration=req.calibration, overwrite=True) \
            if req.fp8 else QuantizeOptions(int8=True, backend=backend, calibration=req.calibration, overwrite=True)
        quantized = quantize(root, Path(scratch) / "q", asked, on_step=on_step)
        method = quantized.quantization.get("method")
        on_step(f"compile for {backend}")
        # The quantized step lives in a temporary folder: the parent named is the ONNX it came from.
        parent = {"path": str(root.resolve()), "manifest_sha256": manifest.digest(), "kind": manifest.kind,
                  "quantized_with": method, "quantization_fidelity": quantized.fidelity}
        compiled = compile_artifact(Path(scratch) / "q", backend, out, compile_options, overwrite=req.overwrite,
                                    parent=parent)
    return compiled


def _build_genai(artifact: str | Path, backend: str, out: str | Path, req: BuildRequest,
                 on_step: Callable[[str], Any]) -> Manifest:
    """The OpenVINO engine compiled as asked, then rewritten into GenAI's folder layout."""
    from enginekit.registry import stage
    from enginekit.runtimes.openvino_genai import check_genai_backend

    check_genai_backend(backend)
    write_genai_layout = stage(read_manifest(artifact).task, "genai_layout")  # refused before compiling
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.ov-", dir=Path(out).parent) as scratch:
        build_engine(artifact, backend, Path(scratch) / "ov", replace(req, genai=False, overwrite=True),
                     on_step=on_step)
        on_step("writing OpenVINO GenAI's layout")
        return write_genai_layout(Path(scratch) / "ov", out, overwrite=req.overwrite, on_step=on_step)


def output_paths(out: str | Path, count: int) -> list[Path]:
    """``out`` for one image; ``stem-1.png``, ``stem-2.png``, ... beside it for several."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise InputError(f"{out}: the output must end in .png, .jpg or .webp")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count + 1)]


def generate_images(
    artifact: str | Path,
    prompts: Sequence[str] | str,
    out: str | Path,
    *,
    device: str = "auto",
    backend: str | None = None,
    overwrite: bool = True,
    digest: str | None = None,
    verify_with: str | Path | None = None,
    init_image: str | Path | None = None,
    on_step: Callable[[int, float, Any], Any] | None = None,
    low_memory: bool = False,
    stages: Any = None,
    **call: Any,
) -> tuple[list[Path], Any]:
    """Run the text-to-image artifact and write its images to ``out`` (see :func:`output_paths`).

    Each file is written to a temporary name beside it and renamed into place, so an
    interrupted or failed run leaves no half-written image. Each image carries what made it
    as A1111's generation parameters (a PNG's ``parameters`` text chunk, a JPEG's or WebP's
    EXIF UserComment; :mod:`enginekit.runtimes.png_info`). Returns the paths and the
    pipeline's output (seed and timesteps). ``digest`` / ``verify_with`` pin the artifact
    as :func:`enginekit.load` does, in the same load that runs it. ``low_memory`` loads it so
    (:func:`enginekit.load`); ``stages`` (an :class:`enginekit.memory.StagePeaks`) records each
    step's peak resident memory."""
    count = (1 if isinstance(prompts, str) else len(prompts)) * int(call.get("num_images_per_prompt", 1))
    paths = output_paths(out, count)
    if not overwrite:
        taken = [p for p in paths if p.exists()]
        if taken:
            raise InputError(f"{taken[0]} already exists; choose another output or pass --overwrite")
    with load(artifact, device=device, backend=backend, digest=digest, verify_with=verify_with,
              low_memory=low_memory) as pipe:
        if not callable(pipe):  # a task that generates is called; a classifier predicts
            raise InputError(f"{artifact} is a {pipe.task} artifact; generate needs a text-to-image pipeline")
        pipe.stages = stages
        result = pipe(prompts, image=init_image, callback=on_step, output_type="pil", **call)
        texts = _infotexts(pipe, Path(artifact).resolve().name, prompts, result, call, init_image is not None)
    from enginekit.runtimes.png_info import save_image

    for path, image, text in zip(paths, result.images, texts):
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
        write_file(path, lambda f, image=image, fmt=fmt, text=text: save_image(image, f, fmt, text))
    return paths, result


def _infotexts(pipe: Any, model: str, prompts: Sequence[str] | str, result: Any, call: Mapping[str, Any],
               image_to_image: bool) -> list[str]:
    """Each image's A1111 generation parameters: the values that ran (the model's own where the
    call left one unset), the seed of the batch, and the image's place in it."""
    from enginekit.runtimes.png_info import GenerationParams, lora_hashes
    from enginekit.runtimes.tasks.call_args import default_strength, is_inpainting

    config = pipe.config
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    negative = call.get("negative_prompt")
    negatives = [negative] * len(prompts) if negative is None or isinstance(negative, str) else list(negative)
    per_prompt = int(call.get("num_images_per_prompt") or 1)
    guidance = call.get("guidance_scale")
    base = GenerationParams(
        prompt="", negative_prompt=None, steps=call.get("num_inference_steps") or config.default_steps,
        scheduler=call.get("scheduler") or config.default_scheduler,
        cfg_scale=guidance if guidance is not None else config.default_guidance_scale, seed=result.seed,
        width=0, height=0, model=model, model_hash=pipe.manifest.digest()[:10],
        denoising_strength=(call.get("strength") or default_strength(is_inpainting(config, call.get("mask_image"))))
        if image_to_image else None,
        batch_size=len(result.images), lora_hashes=lora_hashes(getattr(result, "loras", ())))
    return [replace(base.at(i), prompt=prompts[i // per_prompt], negative_prompt=negatives[i // per_prompt],
                    width=image.width, height=image.height).infotext() for i, image in enumerate(result.images)]
