"""``export``, ``compile``, ``quantize`` and ``evaluate``: the commands that build artifacts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click

from enginekit.app import render
from enginekit.app.cli.common import DEVICE_HELP, Params, backend_option, cli, emit_json, err_console, given_params
from enginekit.export.diffusion.families import family_names
from enginekit.memory import PeakRSS, gib
from enginekit.quant.vocabulary import help_text
from enginekit.registry import task_names


@cli.command()
@click.argument("args", nargs=-1, metavar="[MODEL] [OUTPUT]")
@click.option("-m", "--model", "model_opt", metavar="MODEL",
              help="The model to export, as optimum-cli takes it (then OUTPUT may follow as an argument).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--family", type=click.Choice(family_names()),
              help="Diffusion family: required for a single-file .safetensors checkpoint, checked otherwise.")
@click.option("--task", type=click.Choice(task_names()),
              help="What MODEL is: checked against the source (a pipeline is not an image-classification "
                   "model), and needed where it cannot tell (a hub id is a classifier unless told).")
@click.option("--random-weights", is_flag=True,
              help="timm:NAME, sd15, sd21, sdxl, sd3-medium, sd35-medium, sd35-large, flux-dev, flux-schnell: "
                   "the real architecture with seeded weights (offline).")
@click.option("--weights", type=click.Path(path_type=Path), help="timm:NAME only: a .safetensors file to load.")
@click.option("--seed", default=0, show_default=True, help="Seed for random weights and parity inputs.")
@click.option("--revision", help="Hub revision (branch, tag or commit) for a hub id.")
@click.option("--opset", default=18, show_default=True, help="ONNX opset.")
@click.option("--atol", type=float, default=None,
              help="Parity budget, absolute part (default 1e-4).")
@click.option("--rtol", type=float, default=None,
              help="Parity budget, part relative to the largest output (default 1e-4 classifiers, 1e-3 pipelines).")
@click.option("--image-check/--no-image-check", default=True, show_default=True,
              help="Pipelines: also compare a whole image with diffusers' on the same latents (40 dB budget); "
                   "off frees each component as soon as it is exported, for less memory.")
@click.option("--lora", "loras", multiple=True, metavar="FILE.safetensors[:SCALE]",
              help="Pipelines: fuse this LoRA (diffusers/PEFT or kohya format) into the weights before export; "
                   "repeatable, fused in order.")
@click.option("--lora-scale", type=float, default=1.0, show_default=True,
              help="Scale for each --lora that names none.")
@click.option("--controlnet", "controlnets", multiple=True, metavar="FOLDER|FILE.safetensors",
              help="SD 1.x/2.x, SDXL: export this ControlNet (a diffusers folder or a single .safetensors file) "
                   "as a component beside the UNet; repeatable (several ControlNets, in order).")
@click.option("--no-t5", "without_t5", is_flag=True,
              help="SD3/SD3.5: leave the T5 encoder out (never loaded), as diffusers allows: prompts condition "
                   "through the CLIP encoders alone; saves T5-XXL's 4.7B parameters (19 GB in fp32).")
@click.option("--weight-format", metavar="fp32|fp16|bf16|int8|int4", default=None,
              help="The weights, as optimum-cli names them (quantize -m takes the same names). Pipelines: the "
                   "denoiser's (T5 int8 when it is int8/int4, else as asked; CLIP and VAE fp32), compressed tensor "
                   "by tensor into MatMulNBits (with --streaming as each is streamed); with -b openvino, NNCF into an "
                   "OpenVINO IR. Classifiers: exported, then quantized for --backend (int8: onnxruntime "
                   "int8-dynamic, openvino int8-static; the specific names, e.g. int8-static, still work). "
                   "Gated against the float export.")
@click.option("--backend", "-b", default=None,
              help="The backend the weights are quantized for: onnxruntime (default) or openvino (NNCF; needed "
                   "for --awq and --scale-estimation).")
@click.option("--group-size", type=int, default=128, show_default=True, help="int8/int4: weights per scale along K.")
@click.option("--ratio", type=float, default=1.0, show_default=True,
              help="int4: share of the int4 candidates' parameters in int4, the rest int8.")
@click.option("--sym", is_flag=True, help="int8/int4: symmetric (no zero points).")
@click.option("--awq", is_flag=True,
              help="int4, -b openvino: NNCF's AWQ (activation-aware scales) on --dataset; skipped by NNCF where "
                   "the model has no pattern for it (an activation or Multiply feeding a MatMul).")
@click.option("--scale-estimation", is_flag=True,
              help="int4, -b openvino: NNCF's scale estimation (scales that minimise each layer's error on --dataset).")
@click.option("--dataset", metavar="FILE|builtin",
              help="Calibration data for --awq / --scale-estimation (and classifiers' static int8): pipelines, a "
                   "prompts file (one per line) or 'builtin'; classifiers, an image folder, an .npy, 'photos' or "
                   "'builtin'. optimum-intel's hub datasets (conceptual_captions, wikitext2, ...) cannot be "
                   "fetched offline.")
@click.option("--component", "component_formats", multiple=True, metavar="NAME=FORMAT",
              help="Pipelines: one component's weight format (repeatable), e.g. text_encoder_2=int4.")
@click.option("--streaming/--no-streaming", default=False, show_default=True,
              help="Pipelines: trace with fake weights and stream the weights tensor by tensor from the "
                   "safetensors (or the seeded generator) into each data file: memory stays near the largest "
                   "tensor, not the model. Skips the PyTorch parity and image checks (never in memory).")
@click.option("--token-merge", type=click.IntRange(min=0), default=0, show_default=True, metavar="R",
              help="ViT classifiers: merge R pairs of similar tokens in each block (ToMe), so later blocks "
                   "attend over fewer tokens: faster, not exact; the export records how far it moved from "
                   "the model, quantize and optimize gate it on held-out data.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export(**params: Any) -> None:
    """Export MODEL to an ONNX artifact and check it against PyTorch.

    \b
      enginekit export MODEL -o OUTPUT
      enginekit export --model MODEL [--task TASK] OUTPUT     (optimum-cli's order)

    \b
    Classifiers (ViT, timm or transformers):
      default                       the built-in digits ViT
      timm:NAME                     e.g. timm:vit_small_patch16_384 (add --random-weights offline)
      PATH                          a folder: timm hub format or transformers save_pretrained
      ORG/NAME, hf-hub:ORG/NAME     a Hugging Face Hub repository (honours HF_HUB_OFFLINE)
    Diffusion pipelines (SD 1.5, SD 2.x, SDXL, SD3, FLUX), one ONNX graph per component:
      tiny-sd15, tiny-sdxl, tiny-sd3, tiny-sd35, tiny-flux  built-in seeded tiny pipelines
      sd15, sd21, sdxl, sd3-medium, sd35-medium, sd35-large, flux-dev, flux-schnell
                                    the real architectures; needs --random-weights
      PATH                          a diffusers folder (model_index.json + component subfolders)
      FILE.safetensors --family F   a single-file checkpoint, as A1111/sdnext keep them
      ORG/NAME --task text-to-image a hub pipeline
    """
    from enginekit.export.api import export_model

    o = Params(params)
    model, out = _model_and_output(o.args, o.model_opt, o.out)
    console = err_console()
    fmt = o.weight_format or ("fp32" if o.component_formats else None)
    if fmt is not None:
        from enginekit.export.api import source_task
        from enginekit.quant.vocabulary import note

        line = note(source_task(model, o.family, o.task), o.backend or "onnxruntime", fmt)
        if line:
            click.echo(line, err=True)
    with PeakRSS(process=True) as peak, console.status("exporting") as status:
        manifest = export_model(
            model, out, family=o.family, task=o.task, random_weights=o.random_weights, weights=o.weights,
            revision=o.revision, seed=o.seed, opset=o.opset, atol=o.atol, rtol=o.rtol, image_check=o.image_check,
            loras=o.loras, lora_scale=o.lora_scale, without_t5=o.without_t5, streaming=o.streaming,
            controlnets=o.controlnets, token_merge=o.token_merge,
            weight_format=fmt, component_formats=_component_methods(o.component_formats) or None,
            group_size=o.group_size, ratio=o.ratio, sym=o.sym, backend=o.backend, awq=o.awq,
            scale_estimation=o.scale_estimation, dataset=o.dataset,
            overwrite=o.overwrite, on_step=_stepper(status),
        )
    if o.as_json:
        emit_json(manifest.to_dict())
        return
    console.print(render.wrote_export(manifest, out), highlight=False)
    console.print(peak_line(peak), highlight=False)


def _stepper(status: Any) -> Callable[[str], None]:
    """A stage's progress: the spinner's text on a terminal; one line per step on stderr
    otherwise (a log, a pipe), where a long export would else say nothing for minutes."""
    def step(msg: str) -> None:
        status.update(msg)
        if not sys.stderr.isatty():
            click.echo(msg, err=True)
    return step


def peak_line(peak: PeakRSS) -> str:
    """``peak RSS 3.2 GiB``: the command's process at its highest (a lower bound where it was sampled)."""
    return f"peak RSS {gib(peak.bytes)}" + (" (sampled: a lower bound)" if peak.how == "sampled" else "")


def _model_and_output(args: tuple[str, ...], model: str | None, out: Path | None) -> tuple[str, Path]:
    """MODEL and OUTPUT from ``export``'s arguments: ``MODEL -o OUT``, ``MODEL OUT`` or ``--model MODEL OUT``."""
    rest = list(args)
    if model is None:
        if not rest:
            raise click.UsageError("give the model to export: enginekit export MODEL -o OUTPUT (or --model MODEL)")
        model = rest.pop(0)
    if rest and out is not None:
        raise click.ClickException(f"OUTPUT is given twice ({rest[0]!r} and -o {out}); give one")
    if len(rest) > 1:
        raise click.ClickException(f"unexpected extra arguments: {' '.join(rest[1:])}")
    if rest:
        out = Path(rest[0])
    if out is None:
        raise click.UsageError("give the folder to write: -o OUTPUT")
    return model, out


@cli.command(name="compile")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--backend", "-b", required=True, help="onnxruntime, openvino or tensorrt (see `enginekit doctor`).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Engine folder to write.")
@click.option("-d", "--device", default="cpu", show_default=True, help=f"Device the engine targets: {DEVICE_HELP}.")
@click.option("--threads", default=0, show_default=True, help="Worker threads (0: backend default).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="OpenVINO: weight precision of the IR (default fp32; a pipeline keeps its family's exceptions, "
                   "e.g. SDXL's VAE, in fp32). TensorRT: fp16/bf16 made in the ONNX by Model Optimizer's AutoCast. "
                   "ONNX Runtime runs the graph's own precision: quantize first.")
@click.option("--fp16", is_flag=True, help="Same as --precision fp16 (trtexec's --fp16).")
@click.option("--bf16", is_flag=True, help="TensorRT: same as --precision bf16 (trtexec's --bf16).")
@click.option("--int8", is_flag=True,
              help="Quantize with the backend's default int8 method first (onnxruntime: int8-dynamic; openvino: "
                   "int8-static, calibrated on --calibration; tensorrt: Model Optimizer's int8 Q/DQ), gated like "
                   "`enginekit quantize`, then compile.")
@click.option("--fp8", is_flag=True,
              help="TensorRT: fp8 Q/DQ by Model Optimizer first (calibrated, gated), then build (trtexec's --fp8).")
@click.option("--calibration", "-c",
              help="With --int8: calibration data, an image folder, a preprocessed .npy, 'photos' (crops of real "
                   "photos, offline) or 'builtin' (default: builtin for the built-in model, photos otherwise).")
@click.option("--batch", type=int,
              help="A static batch: images per call, fixed in the engine (faster kernels at that size; other "
                   "sizes run in slices of it). Pipelines, OpenVINO: the UNet gets 2x for CFG.")
@click.option("--hint", type=click.Choice(["latency", "throughput"], case_sensitive=False),
              help="OpenVINO performance hint (benchmark_app -hint; default latency).")
@click.option("--streams", type=click.IntRange(min=1),
              help="OpenVINO inference streams (benchmark_app -nstreams; default: the hint decides).")
@click.option("--inference-precision", type=click.Choice(["f32", "bf16", "f16"], case_sensitive=False),
              help="OpenVINO run-time precision (benchmark_app -infer_precision; default f32 for float engines).")
@click.option("--graph-optimization-level", type=click.Choice(["disable", "basic", "extended", "all"]),
              help="ONNX Runtime graph optimizations applied offline (default extended).")
@click.option("--transformer-fusions", is_flag=True,
              help="ONNX Runtime, ViT classifiers: fuse with ORT's transformer optimizer (model_type vit) first; "
                   "the fused graph is checked against the unfused one.")
@click.option("--height", type=int, help="OpenVINO, pipelines: compile static shapes for this image height "
                                         "(TensorRT: a static profile at this size).")
@click.option("--width", type=int, help="OpenVINO, pipelines: compile static shapes for this image width "
                                        "(TensorRT: a static profile at this size).")
@click.option("--shapes", multiple=True, metavar="NAME:MIN/OPT/MAX[,...]",
              help="TensorRT: one optimization profile per --shapes, trtexec's shapes (pixel_values:1x3x384x384/"
                   "8x3x384x384/32x3x384x384; a pipeline input as COMPONENT:NAME:...).")
@click.option("--workspace", type=click.IntRange(min=1), metavar="MIB",
              help="TensorRT: the builder's workspace pool limit in MiB (trtexec --memPoolSize=workspace:N).")
@click.option("--builder-optimization-level", type=click.IntRange(0, 5),
              help="TensorRT: 0 (fastest build) to 5 (widest search); default 3 (trtexec --builderOptimizationLevel).")
@click.option("--provider", type=click.Choice(["cuda", "tensorrt"]),
              help="ONNX Runtime with -d cuda: CUDAExecutionProvider, or the TensorRT execution provider (engines "
                   "cached per artifact) in front of CUDA.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A backend option, repeatable (e.g. performance_hint=THROUGHPUT); unknown keys are refused.")
@click.option("--genai", is_flag=True,
              help="OpenVINO, pipelines: write OpenVINO GenAI's folder layout (optimum-cli's, with converted "
                   "tokenizers): openvino_genai.Text2ImagePipeline(OUTPUT, 'CPU') runs it, and so does enginekit.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def compile_cmd(**params: Any) -> None:
    """Compile an ONNX ARTIFACT (every component of a pipeline) into a BACKEND engine.

    \b
    The typed flags belong to one backend each, and the other refuses them:
      openvino      --hint, --streams, --inference-precision, --precision/--fp16
      onnxruntime   --graph-optimization-level, --transformer-fusions, --provider
      tensorrt      --shapes, --workspace, --builder-optimization-level, --fp16/--bf16, --fp8
      all           --batch, --threads, --int8, -d/--device
    """
    from enginekit.app.build import BuildRequest, build_engine

    o = Params(params)
    asked = [f"--{p}" for p, given in (("fp16", o.fp16), ("bf16", o.bf16)) if given]
    asked += [f"--precision {o.precision}"] if o.precision and f"--{o.precision}" not in asked else []
    if len(asked) > 1:
        raise click.ClickException(f"{' and '.join(asked)} disagree; give one")
    precision = "fp16" if o.fp16 else "bf16" if o.bf16 else (o.precision or "fp32")
    flags = {"hint": o.hint.upper() if o.hint else None, "streams": o.streams,
             "inference_precision": o.inference_precision.lower() if o.inference_precision else None,
             "graph_optimization_level": o.graph_optimization_level, "transformer_fusions": o.transformer_fusions,
             "provider": o.provider, "shapes": tuple(o.shapes) or None, "workspace": o.workspace,
             "builder_optimization_level": o.builder_optimization_level}
    console = err_console()
    with PeakRSS(process=True) as peak, console.status(f"compiling for {o.backend}") as status:
        request = BuildRequest(device=o.device, threads=o.threads, precision=precision, height=o.height,
                               width=o.width, batch=o.batch, options=backend_option(o.options), flags=flags,
                               int8=o.int8, fp8=o.fp8, calibration=o.calibration, overwrite=o.overwrite, genai=o.genai)
        manifest = build_engine(o.artifact, o.backend, o.out, request, on_step=_stepper(status))
    if o.as_json:
        emit_json(manifest.to_dict())
        return
    console.print(render.wrote_compile(manifest, o.out), highlight=False)
    console.print(peak_line(peak), highlight=False)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--method", "-m", default=None, metavar="fp16|bf16|int8|int4",
              help=f"optimum-cli's names, for classifiers and pipelines alike: int8 is the backend's best int8 "
                   f"for the artifact (classifiers: {help_text()}; pipelines: the int8 plan below). The specific "
                   "methods still work, and say what they are: onnxruntime int8-dynamic, int8-static, int4-weight; "
                   "openvino int8-static, int8-weight, int4-weight; tensorrt int8-qdq.")
@click.option("--int8", is_flag=True,
              help="Same as -m int8: onnxruntime int8-dynamic, openvino int8-static (calibrated on --calibration, "
                   "default photos), tensorrt int8-qdq; pipelines, the int8 plan.")
@click.option("--fp16", is_flag=True, help="Same as --method fp16.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--backend", "-b", default=None, help="onnxruntime (default) or openvino.")
@click.option("--target", type=click.Choice(["tensorrt"]), default=None,
              help="Build a TensorRT-ready ONNX (validated here on ONNX Runtime).")
@click.option("--calibration", "-c", help="Calibration data: an image folder, a preprocessed .npy, 'photos' "
                                          "(crops of real photos, offline), 'patterns' or 'builtin'.")
@click.option("--dataset", help="--calibration under optimum-intel's name (pipelines: a prompts file or 'builtin'); "
                                "its hub datasets (conceptual_captions, wikitext2, ...) cannot be fetched offline.")
@click.option("--awq", is_flag=True, help="-m int4 -b openvino: NNCF's AWQ, calibrated on --dataset.")
@click.option("--scale-estimation", is_flag=True,
              help="-m int4 -b openvino: NNCF's scale estimation, calibrated on --dataset.")
@click.option("--eval-data", help="Held-out data for the fidelity gate: a folder, an .npy, 'photos', 'patterns' "
                                  "or 'builtin' (default: a fifth of --calibration, else the built-in digits' "
                                  "held-out split for the built-in model, else held-out 'photos' crops; seeded "
                                  "noise only without scikit-learn, and then said so).")
@click.option("--calibrate-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              show_default=True, help="onnxruntime static int8: how activation ranges are chosen.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="int8 weight scales.")
@click.option("--group-size", default=128, show_default=True, help="int4: weights per scale.")
@click.option("--symmetric/--asymmetric", default=True, show_default=True, help="int4 weights.")
@click.option("--ratio", default=1.0, show_default=True, help="openvino int4: share of weights in int4 (rest int8).")
@click.option("--exclude", multiple=True, help="Node to keep in float (repeatable).")
@click.option("--min-agreement", type=float, help="Budget: top-1 agreement with the float parent (method default).")
@click.option("--min-cosine", type=float, help="Budget: logits cosine with the float parent (method default).")
@click.option("--auto-fallback", is_flag=True, help="Static int8: keep the layers that hurt most in float "
                                                     "until the budget holds.")
@click.option("--allow-synthetic-calibration", is_flag=True, help="Let --calibration synthetic calibrate on noise.")
@click.option("--calibration-size", default=64, show_default=True, help="At most this many calibration samples.")
@click.option("--eval-size", default=64, show_default=True, help="At most this many held-out samples.")
@click.option("--component", "component_methods", multiple=True, metavar="NAME=METHOD",
              help="Pipelines: one component's method, fp32|fp16|int8|int4 (repeatable), e.g. vae_decoder=fp16.")
@click.option("--calibration-prompts", default=8, show_default=True,
              help="Pipelines: how many prompts of --calibration the float pipeline generates to record the "
                   "denoiser's inputs.")
@click.option("--calibration-steps", type=int, default=None, help="Pipelines: steps per calibration prompt "
                                                                   "(default: the gate's 4).")
@click.option("--min-psnr", type=float, help="Pipelines: budget, PSNR (dB) of the worst gate image vs the float "
                                             "parent (default fp16 35, int8 28, int4 22).")
@click.option("--min-ssim", type=float, help="Pipelines: budget, SSIM of the worst gate image vs the float parent "
                                             "(default fp16 0.98, int8 0.90, int4 0.80).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def quantize(ctx: click.Context, artifact: Path, out: Path, component_methods: tuple[str, ...], as_json: bool,
             **_: Any) -> None:
    """Quantize a float ONNX ARTIFACT; the result must keep its fidelity.

    \b
    Classifiers: measured against the float parent on held-out inputs
    (top-1 agreement, logits cosine, max abs error; accuracy when the data is
    labelled one folder per class).
    Pipelines (-m fp16|int8|int4): the denoiser gets the method, text encoders
    int8 weight-only (fp16 for fp16), the VAE stays fp32 (fp16 for fp16 unless
    the family's VAE overflows, as SDXL's); --calibration is a prompts file (one
    per line; default a built-in list). Gated on the image: 2 prompts x 2 seeds,
    4 steps, against the float parent (and diffusers when rebuildable), PSNR and
    SSIM of the worst image (defaults fp16 35 dB / 0.98, int8 28 dB / 0.90, int4
    22 dB / 0.80).
    Under budget, nothing is written and the command exits 1 with the numbers.
    """
    from enginekit.stages import QuantizeOptions, quantize as run_quantize

    from enginekit.quant.api import method_note

    fields = given_params(ctx, exclude=("artifact", "out", "as_json", "component_methods"))
    if "exclude" in fields:
        fields["exclude"] = tuple(fields["exclude"])
    if component_methods:
        fields["components"] = _component_methods(component_methods)
    options = QuantizeOptions(**fields)
    line = method_note(artifact, options)
    if line:
        click.echo(line, err=True)
    console = err_console()
    with console.status("quantizing") as status:
        manifest = run_quantize(artifact, out, options, on_step=_stepper(status))
    if as_json:
        emit_json(manifest.to_dict())
        return
    console.print(render.wrote_quantize(manifest, out), highlight=False)


def _component_methods(items: tuple[str, ...]) -> dict[str, str]:
    """``--component NAME=METHOD``, repeatable."""
    overrides: dict[str, str] = {}
    for item in items:
        comp, sep, value = item.partition("=")
        if not sep or not comp or not value:
            raise click.UsageError(f"--component takes NAME=METHOD (e.g. unet=int8), got {item!r}")
        overrides[comp.strip()] = value.strip()
    return overrides



@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", "-d", help="Labelled images (one sub-folder per class), an .npy, or 'builtin' ('photos' "
                                   "is unlabelled: it measures agreement with the float parent only).")
@click.option("--limit", type=int, help="Use at most this many samples.")
@click.option("--json", "as_json", is_flag=True)
def evaluate(artifact: Path, data: str | None, limit: int | None, as_json: bool) -> None:
    """Accuracy of ARTIFACT on labelled data, and its agreement with the float parent."""
    from enginekit.stages import evaluate as run_evaluate

    with err_console().status("evaluating"):
        report = run_evaluate(artifact, data, limit=limit)
    if as_json:
        emit_json(report)
        return
    render.stdout_console(160).print(render.evaluate_table(artifact, report))
