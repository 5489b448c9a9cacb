"""The ``enginekit`` command line.

Thin by design: each command parses options and calls one library function.
Errors from the library (:class:`EngineKitError`) become one line on stderr and
exit status 1; a missing optional dependency names the extra to install.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from enginekit import __version__
from enginekit.errors import EngineKitError

_EXTRA_FOR = {"torch": "export", "timm": "export", "transformers": "export", "torchvision": "export",
              "onnxruntime": "onnxruntime", "openvino": "openvino", "sklearn": "data", "onnxscript": "export", "nncf": "quant", "matplotlib": "bench",
              "fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "multipart": "serve"}


class _Group(click.Group):
    """Turns library errors into ``Error: <one line>`` and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EngineKitError as exc:
            raise click.ClickException(str(exc)) from None
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if top in _EXTRA_FOR:
                raise click.ClickException(
                    f"this command needs {top}: pip install 'enginekit[{_EXTRA_FOR[top]}]'"
                ) from None
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; no partial output was left behind", err=True)
            sys.exit(130)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="enginekit")
@click.option("-v", "--verbose", is_flag=True, help="Log what enginekit decides (device picked, cache used).")
def cli(verbose: bool) -> None:
    """Turn PyTorch models into compiled, quantized engines and run them.

    \b
    Stages, each reading an artifact folder and writing a new one:
      export MODEL -o onnx/           PyTorch -> ONNX, parity-checked (ViT or SD pipeline)
      compile onnx/ --backend B -o e/  ONNX -> ONNX Runtime or OpenVINO engine
      quantize onnx/ -m METHOD -o q/  fp16 / int8 / int4, gated on fidelity
      optimize MODEL -o best/         all of the above: the fastest engine that keeps its
                                      fidelity to PyTorch, with the commands that rebuild it
      evaluate q/ --data labelled/    accuracy and agreement with the float parent
      predict e/ IMAGES...            classify images with any artifact
      generate e/ PROMPT -o a.png     text-to-image with a pipeline artifact
      inspect e/                      show what an artifact's manifest says, and its digest
      sign e/ --key key.pem           sign an artifact (check it with --verify-with key.pub)
      doctor                          hardware, installed backends, versions
      bench e/ f/ --batch 1,8         time engines; records go to a results store
      bench report results/ -o rep/   tables and plots per hardware and across
      demo                            the whole path on the built-in model
      serve e/ f/ --port 8000         HTTP: KServe v2, /v1/classify, /v1/generate, a web page
    """
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")


@cli.command()
@click.argument("args", nargs=-1, metavar="[MODEL] [OUTPUT]")
@click.option("-m", "--model", "model_opt", metavar="MODEL",
              help="The model to export, as optimum-cli takes it (then OUTPUT may follow as an argument).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--family", type=click.Choice(["sd15", "sd21", "sdxl", "sd3", "flux"]),
              help="Diffusion family: required for a single-file .safetensors checkpoint, checked otherwise.")
@click.option("--task", type=click.Choice(["image-classification", "text-to-image"]),
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
@click.option("--no-t5", "without_t5", is_flag=True,
              help="SD3/SD3.5: leave the T5 encoder out (never loaded), as diffusers allows: prompts condition "
                   "through the CLIP encoders alone; saves T5-XXL's 4.7B parameters (19 GB in fp32).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export(args: tuple[str, ...], model_opt: str | None, out: Path | None, family: str | None, task: str | None,
           random_weights: bool, weights: Path | None, seed: int, revision: str | None, opset: int,
           atol: float | None, rtol: float | None, image_check: bool, loras: tuple[str, ...], lora_scale: float,
           without_t5: bool, overwrite: bool, as_json: bool) -> None:
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

    model, out = _model_and_output(args, model_opt, out)
    console = _console()
    with console.status("exporting") as status:
        manifest = export_model(
            model, out, family=family, task=task, random_weights=random_weights, weights=weights,
            revision=revision, seed=seed, opset=opset, atol=atol, rtol=rtol, image_check=image_check,
            loras=loras, lora_scale=lora_scale, without_t5=without_t5, overwrite=overwrite,
            on_step=lambda msg: status.update(msg),
        )
    if as_json:
        _emit_json(manifest.to_dict())
        return
    fid = manifest.fidelity
    if manifest.task == "text-to-image":
        worst = min((c.fidelity.get("min_cosine", 1.0) for c in manifest.components.values()), default=1.0)
        peak = manifest.provenance.get("peak_rss_bytes")
        image = fid.get("image")
        console.print(
            f"[green]wrote[/] {out}  ({manifest.family}: {', '.join(manifest.components)}; parity vs PyTorch: "
            f"worst component cosine {worst:.6f}"
            + (f", image {image['psnr_db']:.1f} dB vs diffusers ({image['steps']} steps, {image['width']} px)"
               if image else "")
            + (f"; peak memory {peak / 2**30:.1f} GiB" if peak else "") + ")"
        )
        return
    console.print(
        f"[green]wrote[/] {out}  ({manifest.provenance.get('architecture')}, "
        f"parity vs PyTorch: logits max abs {fid['logits_max_abs']:.2e}, cosine {fid['logits_cosine']:.6f})"
    )


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


def _backend_option(values: tuple[str, ...]) -> dict[str, Any]:
    """``--option key=value``: the value is read as JSON where it parses (numbers, true, lists), else a string."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


_DEVICE_HELP = ("cpu, gpu (CUDA on ONNX Runtime; refused where there is none), AUTO (OpenVINO's AUTO plugin "
                "picks) or auto (enginekit picks the best device here and says which)")


@cli.command(name="compile")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--backend", "-b", required=True, help="onnxruntime or openvino (see `enginekit doctor`).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Engine folder to write.")
@click.option("-d", "--device", default="cpu", show_default=True, help=f"Device the engine targets: {_DEVICE_HELP}.")
@click.option("--threads", default=0, show_default=True, help="Worker threads (0: backend default).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default=None,
              help="OpenVINO: weight precision of the IR (default fp32; a pipeline keeps its family's exceptions, "
                   "e.g. SDXL's VAE, in fp32). ONNX Runtime runs the graph's own precision: quantize first.")
@click.option("--fp16", is_flag=True, help="Same as --precision fp16 (trtexec's --fp16).")
@click.option("--int8", is_flag=True,
              help="Quantize with the backend's default int8 method first (onnxruntime: int8-dynamic; openvino: "
                   "int8-static, calibrated on --calibration), gated like `enginekit quantize`, then compile.")
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
@click.option("--height", type=int, help="OpenVINO, pipelines: compile static shapes for this image height.")
@click.option("--width", type=int, help="OpenVINO, pipelines: compile static shapes for this image width.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A backend option, repeatable (e.g. performance_hint=THROUGHPUT); unknown keys are refused.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def compile_cmd(artifact: Path, backend: str, out: Path, device: str, threads: int, precision: str | None,
                fp16: bool, int8: bool, calibration: str | None, batch: int | None, hint: str | None,
                streams: int | None, inference_precision: str | None, graph_optimization_level: str | None,
                transformer_fusions: bool, height: int | None, width: int | None, options: tuple[str, ...],
                overwrite: bool, as_json: bool) -> None:
    """Compile an ONNX ARTIFACT (every component of a pipeline) into a BACKEND engine.

    \b
    The typed flags belong to one backend each, and the other refuses them:
      openvino      --hint, --streams, --inference-precision, --precision/--fp16
      onnxruntime   --graph-optimization-level, --transformer-fusions
      both          --batch, --threads, --int8, -d/--device
    """
    from enginekit.app.build import build_engine

    if fp16 and precision not in (None, "fp16"):
        raise click.ClickException(f"--fp16 and --precision {precision} disagree; give one")
    precision = "fp16" if fp16 else (precision or "fp32")
    flags = {"hint": hint.upper() if hint else None, "streams": streams,
             "inference_precision": inference_precision.lower() if inference_precision else None,
             "graph_optimization_level": graph_optimization_level, "transformer_fusions": transformer_fusions}
    console = _console()
    with console.status(f"compiling for {backend}") as status:
        manifest = build_engine(artifact, backend, out, device=device, threads=threads, precision=precision,
                                height=height, width=width, batch=batch, options=_backend_option(options),
                                flags=flags, int8=int8, calibration=calibration, overwrite=overwrite,
                                on_step=lambda msg: status.update(msg))
    if as_json:
        _emit_json(manifest.to_dict())
    else:
        precisions = ", ".join(sorted({c.precision for c in manifest.components.values()}))
        fused = manifest.target.get("transformer_fusions")
        console.print(f"[green]wrote[/] {out}  ({manifest.kind}, {len(manifest.components)} component(s), "
                      f"{precisions}, device {manifest.target.get('device')}"
                      + (f"; fused {', '.join(f'{n} {k}' for k, n in fused['fused'].items()) or 'nothing'}, "
                         f"max abs {fused['check'].get('logits_max_abs', 0):.1e} vs unfused"
                         if fused and "fused" in fused else "") + ")")


def _task_section(artifact: Path) -> dict[str, Any]:
    """The artifact's task_config, or {} when it has no readable manifest (load reports why)."""
    from enginekit.errors import EngineKitError
    from enginekit.manifest import read_manifest

    try:
        return dict(read_manifest(artifact).task_config or {})
    except (EngineKitError, OSError):
        return {}


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Image file to write (.png, .jpg, .webp); several images get -1, -2, ... before the suffix.")
@click.option("--negative", default=None, help="Negative prompt.")
@click.option("--steps", type=int, default=None,
              help="Denoising steps (default: the model's own where its export records one, FLUX schnell 4 and "
                   "dev 28; else 20).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale, 1 turns CFG off (default: the model's own, FLUX schnell 0 "
                   "and dev 3.5; else 7.5).")
@click.option("--seed", type=int, default=None, help="Seed for numpy's generator (printed when omitted).")
@click.option("--height", type=int, help="Image height, a multiple of 8 (default: the model's size).")
@click.option("--width", type=int, help="Image width, a multiple of 8 (default: the model's size).")
@click.option("--scheduler", type=click.Choice(["euler", "euler-a", "ddim", "dpm++2m", "dpm++2m-karras", "lcm",
                                                "flow-euler"]),
              default=None, help="Sampler (default: the pipeline's own where ported, else euler; SD3: flow-euler).")
@click.option("--max-sequence-length", type=int, default=None,
              help="SD3, FLUX: T5 prompt tokens (SD3 default 256; FLUX dev 512, schnell 256; at most 512).")
@click.option("--true-cfg", "true_cfg", type=float, default=None,
              help="FLUX: true CFG scale (> 1, with --negative: a second pass on the negative prompt).")
@click.option("--init-image", type=click.Path(path_type=Path), help="Image-to-image: start from this picture.")
@click.option("--strength", default=0.8, show_default=True, help="Image-to-image: how much of it to repaint (0-1].")
@click.option("--num-images", default=1, show_default=True, help="Images for the prompt.")
@click.option("-d", "--device", default="auto", show_default=True, help=_DEVICE_HELP + ".")
@click.option("--backend", help="Backend to run on (default: the one the artifact was built for).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@click.option("--digest", help="Refuse the artifact unless its manifest digest (see `enginekit inspect`) is this.")
@click.option("--verify-with", type=click.Path(path_type=Path),
              help="Refuse the artifact unless its signature (`enginekit sign`) verifies with this public key.")
def generate(artifact: Path, prompt: str, out: Path, negative: str | None, steps: int | None, guidance: float | None,
             seed: int | None, height: int | None, width: int | None, scheduler: str | None,
             max_sequence_length: int | None, true_cfg: float | None, init_image: Path | None, strength: float, num_images: int, device: str,
             backend: str | None, as_json: bool, digest: str | None, verify_with: Path | None) -> None:
    """Generate images for PROMPT with a text-to-image ARTIFACT (torch-free)."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from enginekit.app.build import generate_images

    started = time.perf_counter()
    with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_console(), transient=True, disable=as_json) as progress:
        bar = progress.add_task("denoising", total=None)

        def on_step(step: int, t: float, latents: Any) -> None:
            progress.update(bar, completed=step + 1, total=max(step + 1, progress.tasks[0].total or 0))

        # None lets the pipeline use the model's own defaults where the export recorded them.
        if steps is None and "default_steps" not in _task_section(artifact):
            steps = 20
        call: dict[str, Any] = dict(negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                                    height=height, width=width, num_images_per_prompt=num_images, seed=seed,
                                    scheduler=scheduler)
        if init_image is not None:
            call["strength"] = strength
        if max_sequence_length is not None:
            call["max_sequence_length"] = max_sequence_length
        if true_cfg is not None:
            call["true_cfg_scale"] = true_cfg
        paths, result = generate_images(artifact, prompt, out, device=device, backend=backend,
                                        digest=digest, verify_with=verify_with, init_image=init_image,
                                        on_step=on_step, **call)
    elapsed = time.perf_counter() - started
    if as_json:
        _emit_json({"images": [str(p) for p in paths], "seed": result.seed, "steps": len(result.timesteps),
                    "seconds": round(elapsed, 3)})
        return
    _console().print(f"[green]wrote[/] {', '.join(map(str, paths))}  (seed {result.seed}, "
                     f"{len(result.timesteps)} steps, {elapsed:.1f} s)")


def _finite(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", "-k", default=5, show_default=True, help="Classes to list per image.")
@click.option("-d", "--device", default="auto", show_default=True, help=_DEVICE_HELP + ".")
@click.option("--backend", "-b",
              help="Backend to run on (default: the one the artifact was built for; an exported ONNX artifact "
                   "also runs on openvino, no compile step).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--skip-bad", is_flag=True,
              help="Skip files that are not readable images (listed at the end) instead of stopping at the first.")
@click.option("--digest", help="Refuse the artifact unless its manifest digest (see `enginekit inspect`) is this.")
@click.option("--verify-with", type=click.Path(path_type=Path),
              help="Refuse the artifact unless its signature (`enginekit sign`) verifies with this public key.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON array, one object per image in order: image, label, index, score, top_k "
                   "(with --skip-bad, a skipped file's object has image and error instead).")
def predict(artifact: Path, images: tuple[str, ...], top_k: int, device: str, backend: str | None,
            batch_size: int, skip_bad: bool, digest: str | None, verify_with: Path | None, as_json: bool) -> None:
    """Classify IMAGES (files or folders) with an ARTIFACT."""
    import enginekit
    from enginekit.errors import ImageError, InputError
    from enginekit.manifest import read_manifest
    from enginekit.runtimes.images import expand_image_paths, load_images

    paths = expand_image_paths(images)
    task = read_manifest(artifact).task
    if task != "image-classification":
        raise InputError(f"{artifact} is a {task} artifact; predict classifies images "
                         "(for a pipeline: enginekit generate ART PROMPT -o OUT.png)")
    results: list[tuple[Path, Any, str | None]] = []  # (path, prediction, error)
    with enginekit.load(artifact, device=device, backend=backend, batch_size=batch_size, digest=digest,
                        verify_with=verify_with) as clf:
        if skip_bad:
            for start in range(0, len(paths), batch_size):
                good: list[tuple[Path, Any]] = []
                for path in paths[start : start + batch_size]:
                    try:
                        good.append((path, load_images([path])[0]))
                    except ImageError as exc:
                        results.append((path, None, str(exc)))
                preds = clf.predict([image for _, image in good], top_k=top_k) if good else []
                results.extend((path, pred, None) for (path, _), pred in zip(good, preds))
            order = {p: i for i, p in enumerate(paths)}
            results.sort(key=lambda r: order[r[0]])
        else:
            results = [(p, pred, None) for p, pred in zip(paths, clf.predict(paths, top_k=top_k))]
        bad = [(p, err) for p, _, err in results if err is not None]
        if bad and len(bad) == len(results):
            raise InputError(f"none of the {len(results)} image(s) could be read; first: {bad[0][1]}")
        if as_json:
            data = [{"image": str(p), "error": err} if err is not None else {"image": str(p), **pred.to_dict()}
                    for p, pred, err in results]
            click.echo(json.dumps(_finite(data), indent=2, allow_nan=False))
        else:
            from rich.markup import escape
            from rich.table import Table

            table = Table(title=f"{escape(str(artifact))} on {clf.backend}:{clf.device}")
            table.add_column("image", overflow="fold")
            table.add_column("label")
            table.add_column("score", justify="right")
            if top_k > 1:
                table.add_column(f"top {top_k}")
            for path, pred, err in results:
                if err is not None:
                    continue
                row = [escape(str(path)), escape(pred.label), f"{pred.score:.4f}"]
                if top_k > 1:
                    row.append(escape(", ".join(f"{lbl} {s:.3f}" for lbl, s in pred.top_k)))
                table.add_row(*row)
            from rich.console import Console

            Console().print(table)
    if bad:
        click.echo(f"skipped {len(bad)} of {len(results)} file(s), not readable images:", err=True)
        for _, err in bad:
            click.echo(f"  {err}", err=True)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print the digest, integrity, pin and signature verdicts and the manifest, as JSON.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Hash every file and check it against its sha256 (a full check: no remembered result is used).")
@click.option("--digest", help="Check the artifact against this pinned manifest digest (sha256:HEX).")
@click.option("--verify-with", type=click.Path(path_type=Path), help="Check the signature with this public key (PEM).")
def inspect(artifact: Path, as_json: bool, verify: bool, digest: str | None, verify_with: Path | None) -> None:
    """Show what an ARTIFACT's manifest says, readably, its digest, and whether it is
    intact, pinned and signed (pin it with `serve NAME=PATH@sha256:HEX`, `predict/generate
    --digest` or `enginekit.load(path, digest=...)`). Exits 1 when a check fails."""
    from enginekit.app.inspect import artifact_report, render_manifest, render_trust, report_failures
    from enginekit.manifest import Manifest

    report = artifact_report(artifact, verify=verify, digest=digest, verify_with=verify_with)
    failures = report_failures(report)
    if as_json:
        _emit_json(report)
    else:
        from rich.console import Console

        # Piped or captured output has no terminal width to fit: keep whole names and shapes.
        console = Console() if sys.stdout.isatty() else Console(width=200)
        integrity = report["integrity"]
        verified = integrity["detail"] if integrity["verdict"] == "failed" else integrity["verdict"] == "ok"
        console.print(render_manifest(Manifest.from_dict(report["manifest"]), artifact, verified=verified))
        console.print(render_trust(report), highlight=False, soft_wrap=True, markup=False)
    if failures:
        raise click.ClickException(failures[0])


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(path_type=Path), help="Elliptic-curve private key (PEM).")
@click.option("--password", default=None, help="The private key's password, if it has one.")
def sign(artifact: Path, key: Path, password: str | None) -> None:
    """Sign ARTIFACT with OpenSSF model-signing (private-key mode, offline): writes
    ARTIFACT/signature.sig; check it with `--verify-with KEY.pub` or `load(..., verify_with=)`."""
    from enginekit.signing import sign_artifact

    target = sign_artifact(artifact, key, password=password)
    _console().print(f"[green]signed[/] {artifact}  ({target.name})")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--method", "-m", default=None,
              help="onnxruntime: int8-dynamic, int8-static, int4-weight, fp16; openvino: int8-static, "
                   "int8-weight, int4-weight, fp16; tensorrt: int8-qdq.")
@click.option("--int8", is_flag=True,
              help="The backend's default int8 method: onnxruntime int8-dynamic, openvino int8-static "
                   "(calibrated on --calibration, default photos), tensorrt int8-qdq.")
@click.option("--fp16", is_flag=True, help="Same as --method fp16.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--backend", "-b", default=None, help="onnxruntime (default) or openvino.")
@click.option("--target", type=click.Choice(["tensorrt"]), default=None,
              help="Build a TensorRT-ready ONNX (validated here on ONNX Runtime).")
@click.option("--calibration", "-c", help="Calibration data: an image folder, a preprocessed .npy, 'photos' "
                                          "(crops of real photos, offline), 'patterns' or 'builtin'.")
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
def quantize(ctx: click.Context, artifact: Path, method: str | None, int8: bool, fp16: bool, out: Path,
             backend: str | None, target: str | None,
             calibration: str | None, eval_data: str | None, calibrate_method: str, per_channel: bool,
             group_size: int, symmetric: bool, ratio: float, exclude: tuple[str, ...],
             min_agreement: float | None, min_cosine: float | None, auto_fallback: bool,
             allow_synthetic_calibration: bool, calibration_size: int, eval_size: int,
             component_methods: tuple[str, ...], calibration_prompts: int, calibration_steps: int | None,
             min_psnr: float | None, min_ssim: float | None, overwrite: bool, as_json: bool) -> None:
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
    from enginekit.manifest import read_manifest
    from enginekit.quant.api import quantize_artifact
    from enginekit.quant.base import QuantOptions

    given = {n for n in ctx.params if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE}
    if read_manifest(artifact).task == "text-to-image":
        _quantize_pipeline(artifact, method, int8, fp16, out, backend, target, calibration, group_size, ratio,
                           auto_fallback, component_methods, calibration_prompts, calibration_steps, min_psnr,
                           min_ssim, overwrite, as_json, given)
        return
    pipeline_only = sorted(given & {"component_methods", "calibration_prompts", "calibration_steps", "min_psnr",
                                    "min_ssim"})
    if pipeline_only:
        raise click.UsageError(f"{', '.join(_flag(n) for n in pipeline_only)}: pipeline options; "
                               f"{artifact} is a classifier")
    if target and backend and backend != target:
        raise click.UsageError(f"--target {target} and --backend {backend} disagree; give one")
    method = _quant_method(method, int8, fp16, target or backend or "onnxruntime")
    if int8 and calibration is None and method in ("int8-static", "int8-qdq"):
        from enginekit.manifest import read_manifest

        calibration = "builtin" if read_manifest(artifact).provenance.get("source") == "default" else "photos"
    options = QuantOptions(calibrate_method=calibrate_method, per_channel=per_channel, group_size=group_size,
                           symmetric=symmetric, ratio=ratio, exclude_nodes=exclude)
    console = _console()
    with console.status("quantizing") as status:
        manifest = quantize_artifact(
            artifact, out, method, backend=target or backend or "onnxruntime", calibration=calibration,
            eval_data=eval_data, options=options, min_agreement=min_agreement, min_cosine=min_cosine,
            auto_fallback=auto_fallback, allow_synthetic_calibration=allow_synthetic_calibration,
            calibration_size=calibration_size, eval_size=eval_size, overwrite=overwrite,
            on_step=lambda msg: status.update(msg),
        )
    if as_json:
        _emit_json(manifest.to_dict())
        return
    fid = manifest.fidelity
    size = sum(f.size for c in manifest.components.values() for f in c.files)
    acc = f", accuracy {fid['accuracy']:.4f} (float {fid['reference_accuracy']:.4f})" if "accuracy" in fid else ""
    kept = manifest.quantization.get("excluded_nodes") or []
    from enginekit.quant.data import describe_data

    console.print(
        f"[green]wrote[/] {out}  ({manifest.quantization['method']}, {size / 1e6:.1f} MB; vs the float parent: "
        f"agreement {fid['top1_agreement']:.4f}, cosine {fid['logits_cosine']:.5f}{acc} on "
        f"{describe_data(fid.get('inputs', ''), fid['samples'])}"
        f"{f'; {len(kept)} nodes kept in float' if kept else ''})", highlight=False
    )


_FLAGS = {"component_methods": "--component", "eval_data": "--eval-data", "as_json": "--json"}


def _flag(param: str) -> str:
    return _FLAGS.get(param, "--" + param.replace("_", "-"))


def _quantize_pipeline(artifact: Path, method: str | None, int8: bool, fp16: bool, out: Path, backend: str | None,
                       target: str | None, calibration: str | None, group_size: int, ratio: float,
                       auto_fallback: bool, component_methods: tuple[str, ...], calibration_prompts: int,
                       calibration_steps: int | None, min_psnr: float | None, min_ssim: float | None,
                       overwrite: bool, as_json: bool, given: set[str]) -> None:
    """``quantize`` of a text-to-image pipeline: quant.diffusion.quantize_pipeline."""
    from enginekit.quant.diffusion import quantize_pipeline

    classifier_only = sorted(given & {"eval_data", "calibrate_method", "per_channel", "symmetric", "exclude",
                                      "min_agreement", "min_cosine", "allow_synthetic_calibration",
                                      "calibration_size", "eval_size", "target"})
    if classifier_only:
        raise click.UsageError(f"{', '.join(_flag(n) for n in classifier_only)}: classifier options; "
                               f"{artifact} is a text-to-image pipeline (it takes --component, --calibration "
                               "PROMPTS.txt, --min-psnr, --min-ssim)")
    chosen = [name for name, on in (("--method", method is not None), ("--int8", int8), ("--fp16", fp16)) if on]
    if len(chosen) != 1:
        raise click.UsageError("give the quantization: -m fp16|int8|int4, --int8 or --fp16" if not chosen
                               else f"{' and '.join(chosen)} disagree; give one")
    name = "fp16" if fp16 else "int8" if int8 else str(method)
    overrides: dict[str, str] = {}
    for item in component_methods:
        comp, sep, value = item.partition("=")
        if not sep or not comp or not value:
            raise click.UsageError(f"--component takes NAME=METHOD (e.g. unet=int8), got {item!r}")
        overrides[comp.strip()] = value.strip()
    console = _console()
    with console.status("quantizing") as status:
        def step(msg: str) -> None:
            status.update(msg)
            if not sys.stderr.isatty():
                click.echo(msg, err=True)

        manifest = quantize_pipeline(
            artifact, out, name, backend=backend or "onnxruntime", components=overrides or None,
            calibration=calibration, calibration_prompts=calibration_prompts, calibration_steps=calibration_steps,
            group_size=group_size, ratio=ratio, min_psnr=min_psnr, min_ssim=min_ssim, auto_fallback=auto_fallback,
            overwrite=overwrite, on_step=step)
    if as_json:
        _emit_json(manifest.to_dict())
        return
    fid = manifest.fidelity
    size = sum(f.size for c in manifest.components.values() for f in c.files)
    plan = ", ".join(f"{n} {d['method']}" for n, d in manifest.quantization["components"].items())
    vs_d = fid.get("vs_diffusers")
    extra = f"; vs diffusers {vs_d['psnr_db']:.2f} dB" if vs_d else ""
    console.print(f"[green]wrote[/] {out}  ({plan}; {size / 1e6:.1f} MB; worst gate image vs the float parent: "
                  f"PSNR {fid['vs_parent']['psnr_db']:.2f} dB, SSIM {fid['vs_parent']['ssim']:.4f}{extra})",
                  highlight=False)


def _quant_method(method: str | None, int8: bool, fp16: bool, backend: str) -> str:
    """``-m METHOD``, or the shortcut ``--int8`` / ``--fp16`` stands for on ``backend``."""
    from enginekit.app.build import DEFAULT_INT8

    given = [name for name, on in (("--method", method is not None), ("--int8", int8), ("--fp16", fp16)) if on]
    if len(given) != 1:
        raise click.ClickException("give the quantization: -m METHOD, --int8 or --fp16" if not given
                                   else f"{' and '.join(given)} disagree; give one")
    if fp16:
        return "fp16"
    if int8:
        return "int8-qdq" if backend == "tensorrt" else DEFAULT_INT8.get(backend, ("int8-dynamic",))[0]
    return str(method)


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", "-d", help="Labelled images (one sub-folder per class), an .npy, or 'builtin' ('photos' "
                                   "is unlabelled: it measures agreement with the float parent only).")
@click.option("--limit", type=int, help="Use at most this many samples.")
@click.option("--json", "as_json", is_flag=True)
def evaluate(artifact: Path, data: str | None, limit: int | None, as_json: bool) -> None:
    """Accuracy of ARTIFACT on labelled data, and its agreement with the float parent."""
    from enginekit.quant.api import evaluate_artifact

    with _console().status("evaluating"):
        report = evaluate_artifact(artifact, data, limit=limit)
    if as_json:
        _emit_json(report)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{artifact} ({report['method']}) on {report['samples']} samples"))
    table.add_column("measure")
    table.add_column("value", justify="right")
    names = {"accuracy": "accuracy", "reference_accuracy": "float parent accuracy",
             "top1_agreement": "top-1 agreement with float", "logits_cosine": "logits cosine",
             "logits_max_abs": "logits max abs error"}
    for key, label in names.items():
        if key in report:
            table.add_row(label, f"{report[key]:.5g}")
    table.add_row("data", escape(str(report["inputs"])))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


class _BenchGroup(click.Group):
    """`enginekit bench A B ...` runs the benchmark; `enginekit bench report ...` writes a report."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_BenchGroup)
def bench() -> None:
    """Benchmark artifacts on this machine, and report across machines.

    \b
      enginekit bench ART... [--batch 1,8] [--store results/results.jsonl] [--json out.json]
      enginekit bench report results/ -o report/
    """


def _batches(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give batch sizes as 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: batch sizes must be positive integers")
    return sizes


@bench.command(name="run")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch", default="1", show_default=True, help="Batch sizes, comma separated.")
@click.option("--runs", type=int, default=None,
              help="Timed runs per batch size (default 50); a pipeline's per component and step (default 5).")
@click.option("--duration", type=float, default=None, help="Or: seconds of timed runs per batch size.")
@click.option("--warmup", type=int, default=None, help="Untimed runs first (default 10; pipelines 1).")
@click.option("--threads", default=0, show_default=True, help="Engine threads (0: backend default); recorded.")
@click.option("-d", "--device", default="cpu", show_default=True, help=_DEVICE_HELP + ".")
@click.option("--store", type=click.Path(path_type=Path), default=Path("results/results.jsonl"), show_default=True,
              help="JSON-lines results store the records are appended to.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write this run's records here.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Run on every node of the Ray cluster whose head is at HOST:PORT (needs enginekit[ray]).")
@click.option("--baseline", type=click.Choice(["torch"]), default=None,
              help="Also time PyTorch eager fp32 of each artifact's source model in the same run; "
                   "speed-ups are against it.")
@click.option("--mode", type=click.Choice(["latency", "throughput"]), default="latency", show_default=True,
              help="latency: one request at a time; throughput: several in flight (OpenVINO's async infer "
                   "queue, ONNX Runtime sessions run from threads), frames/s as benchmark_app reports.")
@click.option("--requests", "--nireq", "requests", default=0, show_default=True,
              help="Throughput mode: requests in flight (0: OpenVINO's optimal number, else one per core).")
@click.option("--same-process", is_flag=True,
              help="Time every engine in this process (faster; peak memory is then not reported).")
@click.option("--height", type=int, default=None, help="Pipelines: image height (default: the engine's).")
@click.option("--width", type=int, default=None, help="Pipelines: image width (default: the engine's).")
@click.option("--steps", default=20, show_default=True, help="Pipelines: denoising steps of the whole image.")
@click.option("--image-runs", default=1, show_default=True, help="Pipelines: timed whole images (0: none).")
def bench_run(artifacts: tuple[Path, ...], batch: str, runs: int | None, duration: float | None,
              warmup: int | None, threads: int, device: str, store: Path, json_out: Path | None,
              ray_address: str | None, baseline: str | None, mode: str, requests: int, same_process: bool,
              height: int | None, width: int | None, steps: int, image_runs: int) -> None:
    """Time each ARTIFACT: warm latency p50/p90/p99, throughput, load and first
    inference, peak memory, size, and its recorded fidelity, in one row.

    A text-to-image ARTIFACT is timed per component, per denoising step and per
    whole image (--height/--width/--steps); with --baseline torch, diffusers' PyTorch
    pipeline of the same weights runs the same parts before and after the engine.

    A classifier ARTIFACT is timed in a fresh process of its own (its peak memory
    is its own); with --baseline torch, PyTorch eager runs before and after the
    engines, speed-ups divide by the faster, and a warning says when the
    machine's speed moved between the two. The load average and each engine's
    p99/p50 spread are recorded.

    With --ray, each node of the cluster benches copies of the ARTIFACTs (sent
    from here) and the records of every node are appended here."""
    from enginekit.bench.harness import BenchConfig, add_speedups
    from enginekit.bench.pipeline import PipelineBenchConfig, baseline_note, bench_pipeline, is_pipeline
    from enginekit.bench.session import bench_classifiers, run_notes
    from enginekit.bench.store import ResultsStore

    pipelines = [p for p in artifacts if is_pipeline(p)]
    artifacts = tuple(p for p in artifacts if p not in pipelines)
    try:
        config = BenchConfig(batch_sizes=_batches(batch), warmup=10 if warmup is None else warmup,
                             runs=50 if runs is None and duration is None else runs, duration_s=duration,
                             threads=threads)
        pconfig = PipelineBenchConfig(height=height, width=width, steps=steps, images=max(_batches(batch)),
                                      warmup=1 if warmup is None else warmup,
                                      runs=5 if runs is None and duration is None else runs, duration_s=duration,
                                      image_runs=image_runs, threads=threads)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if requests < 0:
        raise click.UsageError(f"--requests must be at least 0, got {requests}")
    if mode == "throughput" and (pipelines or ray_address):
        raise click.UsageError("--mode throughput times classifier artifacts on this machine: "
                               "drop --ray and the pipelines")
    if pipelines and (ray_address or len(_batches(batch)) > 1):
        raise click.UsageError("a text-to-image pipeline is benched here at one batch (--batch N images): "
                               "drop --ray or the extra batch sizes")
    records: list[dict[str, Any]] = []
    if ray_address and artifacts:
        from enginekit.bench.cluster import bench_on_ray

        records = bench_on_ray(ray_address, artifacts, config, device=device, torch_baseline=baseline == "torch",
                               shutdown=False)
    elif artifacts:
        records = bench_classifiers(artifacts, config, device, baseline=baseline == "torch", mode=mode,
                                    requests=requests, isolate=not same_process)
    for path in pipelines:
        records += bench_pipeline(path, pconfig, device=device, baseline=baseline == "torch")
    add_speedups(records)
    ResultsStore(store).append(records)
    if json_out:
        json_out.write_text(json.dumps(records, indent=2, default=str))
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"appended {len(records)} records to {escape(str(store))}")
    parts = any(r.get("part") for r in records)
    rss = any(r.get("peak_rss_bytes") for r in records)
    inflight = any((r.get("conditions") or {}).get("mode") == "throughput" for r in records)
    for col in ("engine", *(("part",) if parts else ()), "method", "batch", *(("in flight",) if inflight else ()),
                "p50 ms", "p90 ms", "p99 ms", "p99/p50", "fps" if inflight else "img/s",
                "speed-up", "load ms", "first ms", *(("peak MB",) if rss else ()), "size MB", "cosine",
                *(("node",) if ray_address else ())):
        table.add_column(col, justify="left" if col in ("engine", "part", "method", "node") else "right")
    for r in records:
        lat = r["latency_ms"]
        cos = r["fidelity"].get("logits_cosine")
        cond = r.get("conditions") or {}
        ratio = cond.get("p99_over_p50")
        table.add_row(escape(r["engine"]["name"]), *((escape(r.get("part") or "-"),) if parts else ()),
                      r["engine"]["method"], str(r["batch"]),
                      *((str(cond.get("requests") or 1),) if inflight else ()), f"{lat['p50']:.2f}",
                      f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", f"{ratio:.2f}" if ratio else "-",
                      f"{r['throughput_ips']:.1f}",
                      f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
                      f"{r['load_ms']:.0f}" if r["load_ms"] is not None else "-",
                      f"{r['first_inference_ms']:.1f}" if r["first_inference_ms"] is not None else "-",
                      *((f"{r['peak_rss_bytes'] / 1e6:.0f}" if r.get("peak_rss_bytes") else "-",) if rss else ()),
                      f"{(r['size_bytes'] or 0) / 1e6:.1f}", f"{cos:.5f}" if cos is not None else "-",
                      *((escape(f"{r['node']['hostname']} {r['node']['node_id'][:8]}"),) if ray_address else ()))
    out = Console(width=None if sys.stdout.isatty() else 200)
    out.print(table)
    note = baseline_note(records)
    if note:
        out.print(escape(note), highlight=False)
    for line in run_notes(records):
        out.print(escape(line), style="bold yellow" if line.startswith("WARNING") else None, highlight=False)
    if ray_address:
        # Records are saved and printed: leave without Ray's driver teardown, which can crash
        # the process after the work is done (a known Ray core-worker shutdown race).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@bench.command(name="report")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--no-plots", is_flag=True, help="Tables only: no PNG plots, and matplotlib is not needed.")
def bench_report(results: tuple[Path, ...], out: Path, no_plots: bool) -> None:
    """Markdown tables and PNG plots from RESULTS (.jsonl files or folders of them),
    per hardware and across hardware."""
    from enginekit.bench.report import write_report
    from enginekit.bench.store import read_results

    files = write_report(read_results(list(results)), out, plots=not no_plots)
    plots = f" and {len(files) - 1} plots" if not no_plots else " (tables only)"
    _console().print(f"[green]wrote[/] {out / 'report.md'}{plots}")


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else None


@cli.command()
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Folder for the picked engine (with report.md and report.json).")
@click.option("--budget-agreement", type=float, default=0.99, show_default=True,
              help="Least top-1 agreement with PyTorch on the held-out samples.")
@click.option("--budget-cosine", type=float, default=0.999, show_default=True,
              help="Least mean cosine between the engine's logits and PyTorch's.")
@click.option("--tie-margin", type=float, default=0.0, show_default=True,
              help="Count held-out samples whose PyTorch top-2 logit gap is under this many standard deviations "
                   "of the logits as ties, left out of the agreement budget (both agreements are reported).")
@click.option("--backends", help="Comma-separated backends to try (default: every installed one).")
@click.option("--precisions", default=",".join(("fp32", "fp16", "int8", "int4")), show_default=True,
              help="Precision families to try; fp16 includes bf16.")
@click.option("--batch", default=1, show_default=True, help="Batch size to pick the engine for.")
@click.option("--data", help="Calibration and held-out data: an image folder, an .npy, 'photos', 'patterns' or "
                             "'builtin' (default: builtin for the built-in model, photos otherwise).")
@click.option("--second-data", help="A second, differently made held-out set every candidate must also keep the "
                                    "budget on (default: 'patterns' beside photos or builtin, 'photos' beside "
                                    "your own data).")
@click.option("--calibration-size", default=64, show_default=True,
              help="Samples static int8 methods calibrate on, at most (never the held-out ones).")
@click.option("--eval-size", default=128, show_default=True, help="Held-out samples the budget is checked on.")
@click.option("--runs", type=int, default=None, help="Timed runs per candidate (default 30).")
@click.option("--duration", type=float, default=None, help="Or: seconds of timed runs per candidate.")
@click.option("--warmup", default=5, show_default=True, help="Untimed runs before each timing.")
@click.option("--threads", default=0, show_default=True, help="Threads for every engine and PyTorch (0: defaults).")
@click.option("--dynamic-shape", is_flag=True, help="Keep OpenVINO engines' batch axis dynamic (slower at batch 1).")
@click.option("--random-weights", is_flag=True, help="timm:NAME only: the real architecture with seeded weights.")
@click.option("--weights", type=click.Path(path_type=Path), help="timm:NAME only: a .safetensors file to load.")
@click.option("--revision", help="Hub revision for a hub id.")
@click.option("--seed", default=0, show_default=True, help="Seed for random weights and the export's parity inputs.")
@click.option("--work", type=click.Path(path_type=Path), help="Keep the export and every candidate here.")
@click.option("--store", type=click.Path(path_type=Path), help="Also append the timing records to this results store.")
@click.option("--min-psnr", type=float, default=None,
              help="Pipelines: least image PSNR (dB) against diffusers on every held-out image [default: 30].")
@click.option("--size", type=int, default=None, help="Pipelines: image side judged and timed (default: the model's).")
@click.option("--steps", type=int, default=None, help="Pipelines: denoising steps per image [default: 4].")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Pipelines: held-out prompts, one a line (default: built-in ones no quantizer calibrates on).")
@click.option("--seeds", default=None, help="Pipelines: comma-separated latent seeds per prompt [default: 0].")
@click.option("--no-t5", "without_t5", is_flag=True,
              help="SD3/SD3.5 pipelines: export and judge without the T5 encoder (as `export --no-t5`).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def optimize(ctx: click.Context, model: str, out: Path, budget_agreement: float, budget_cosine: float,
             tie_margin: float, backends: str | None,
             precisions: str, batch: int, data: str | None, second_data: str | None, calibration_size: int,
             eval_size: int,
             runs: int | None, duration: float | None, warmup: int, threads: int, dynamic_shape: bool,
             random_weights: bool, weights: Path | None, revision: str | None, seed: int, work: Path | None,
             store: Path | None, min_psnr: float | None, size: int | None, steps: int | None,
             prompts_file: Path | None, seeds: str | None, without_t5: bool, overwrite: bool,
             as_json: bool) -> None:
    """Find the fastest engine for MODEL on this machine that keeps its fidelity.

    Exports MODEL, builds every candidate (each installed backend x fp32, fp16/bf16,
    int8 and int4), checks each against PyTorch on two held-out sets (from the
    calibration source, and made differently: --second-data), times each
    beside PyTorch eager, and writes the fastest that keeps the budget to OUTPUT
    with a report of every candidate's fate. MODEL is anything `export` takes.

    A diffusion pipeline (tiny-sd15, sd15 --random-weights, a diffusers folder, ...)
    is judged by image PSNR against diffusers on held-out prompts and seeds
    (--min-psnr, --size, --steps, --prompts, --seeds) and picked by its time per
    denoising step.
    """
    from enginekit.export.api import source_task

    given = {name for name in ctx.params
             if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)}
    pipeline_only = {"min_psnr", "size", "steps", "prompts_file", "seeds", "without_t5"}
    if source_task(model) == "text-to-image":
        classifier_only = sorted(given & {"budget_agreement", "budget_cosine", "tie_margin", "batch", "data",
                                          "second_data", "calibration_size", "eval_size", "runs", "duration",
                                          "warmup", "dynamic_shape", "weights", "store"})
        if classifier_only:
            flag = "--" + classifier_only[0].replace("_", "-")
            raise click.UsageError(f"{flag} is for classifiers; {model!r} is a diffusion pipeline (its flags: "
                                   "--min-psnr, --size, --steps, --prompts, --seeds, --no-t5, --backends, --precisions)")
        _optimize_pipeline_cmd(model, out, backends=backends, precisions=precisions, min_psnr=min_psnr, size=size,
                               steps=steps, prompts_file=prompts_file, seeds=seeds, threads=threads,
                               random_weights=random_weights, revision=revision, seed=seed, work=work,
                               without_t5=without_t5, overwrite=overwrite, as_json=as_json)
        return
    wrong = sorted(given & pipeline_only)
    if wrong:
        flag = {"prompts_file": "--prompts", "without_t5": "--no-t5"}.get(wrong[0], "--" + wrong[0].replace("_", "-"))
        raise click.UsageError(f"{flag} is for diffusion pipelines; {model!r} is an image classifier")
    from enginekit.app.optimize import OptimizeConfig
    from enginekit.app.optimize import optimize as run_optimize

    if runs is None and duration is None:
        runs = 30
    try:
        config = OptimizeConfig(backends=_csv(backends), precisions=_csv(precisions) or (), batch=batch,
                                min_agreement=budget_agreement, min_cosine=budget_cosine, tie_margin=tie_margin,
                                data=data, second_data=second_data,
                                calibration_size=calibration_size, eval_size=eval_size,
                                static_shape=not dynamic_shape, warmup=warmup, runs=runs, duration_s=duration,
                                threads=threads)
        config.bench_config()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    console = _console()
    # Progress (ours and the quantizers' own bars) goes to stderr: stdout is the table or the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        report = run_optimize(model, out, config, random_weights=random_weights, weights=weights,
                              revision=revision, seed=seed, work_dir=work, overwrite=overwrite,
                              on_step=lambda msg: console.print(f"[dim]·[/] {msg}", highlight=False))
    if store is not None:
        from enginekit.bench.store import ResultsStore

        ResultsStore(store).append([report["baseline"]] + [c["record"] for c in report["candidates"] if c["record"]])
    if as_json:
        _emit_json(report)
        return
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 150).print(_optimize_table(report))
    for c in report["candidates"]:
        if c["status"] in ("rejected", "failed"):
            console.print(f"[dim]{c['candidate']['name']}: {c['status']}: {c['reason']}[/]", highlight=False)
    console.print(f"[green]wrote[/] {out} ({report['picked']}) and {out / 'report.md'}")
    if report.get("rebuild"):
        console.print("rebuild it by hand:\n" + "\n".join(f"  {line}" for line in report["rebuild"]), highlight=False,
                      markup=False, soft_wrap=True)


def _optimize_pipeline_cmd(model: str, out: Path, *, backends: str | None, precisions: str, min_psnr: float | None,
                           size: int | None, steps: int | None, prompts_file: Path | None, seeds: str | None,
                           threads: int, random_weights: bool, revision: str | None, seed: int, work: Path | None,
                           without_t5: bool, overwrite: bool, as_json: bool) -> None:
    """``optimize`` on a pipeline: see :mod:`enginekit.app.optimize_pipeline`."""
    from enginekit.app.optimize_pipeline import PipelineOptimizeConfig, optimize_pipeline, table_rows

    defaults = PipelineOptimizeConfig()
    prompts = defaults.prompts
    if prompts_file is not None:
        try:
            prompts = tuple(line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines()
                            if line.strip())
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {prompts_file}: {exc}", param_hint="--prompts") from None
    try:
        seed_list = tuple(int(v) for v in _csv(seeds) or ()) or defaults.seeds
    except ValueError:
        raise click.BadParameter(f"{seeds!r} is not a comma-separated list of integers", param_hint="--seeds") from None
    config = PipelineOptimizeConfig(backends=_csv(backends), precisions=_csv(precisions) or (),
                                    min_psnr=defaults.min_psnr if min_psnr is None else min_psnr, size=size,
                                    steps=steps or defaults.steps, prompts=prompts, seeds=seed_list, threads=threads,
                                    without_t5=without_t5)
    console = _console()
    with contextlib.redirect_stdout(sys.stderr):
        report = optimize_pipeline(model, out, config, random_weights=random_weights, revision=revision, seed=seed,
                                   work_dir=work, overwrite=overwrite,
                                   on_step=lambda msg: console.print(f"[dim]·[/] {msg}", highlight=False, markup=False))
    if as_json:
        _emit_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"enginekit optimize {report['model']}: {report['size']}x{report['size']}, "
                        f"{report['steps']} steps, budget PSNR >= {report['budget']['min_psnr_db']:g} dB vs diffusers")
    from enginekit.app.optimize_pipeline import HEADERS

    for col in HEADERS:
        table.add_column(col, justify="left" if col in ("candidate", "precision", "fate") else "right")
    from rich.markup import escape

    for row in table_rows(report):
        table.add_row(*(escape(cell) for cell in row))
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    console.print(f"[green]wrote[/] {out} ({report['picked']}) and {out / 'report.md'}")
    if report.get("rebuild"):
        console.print("rebuild it by hand:\n" + "\n".join(f"  {line}" for line in report["rebuild"]), highlight=False,
                      markup=False, soft_wrap=True)


def _optimize_table(report: dict[str, Any]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    base = report["baseline"]
    labelled = "accuracy" in base["fidelity"]
    data = report.get("data") or {}
    from enginekit.quant.data import describe_data

    judged = " and ".join(describe_data(d["source"], d["size"]) for d in (data.get("held_out"), data.get("second")) if d)
    table = Table(title=f"enginekit optimize {escape(report['model'])}: batch {report['batch']}, budget agreement >= "
                        f"{report['budget']['min_agreement']}, cosine >= {report['budget']['min_cosine']} on "
                        f"each of {escape(judged)}")
    second = (report.get("data") or {}).get("second")
    cols = (["candidate", "precision", "p50 ms", "speed-up", "agreement" + (" (held-out / second)" if second else ""),
             "cosine" + (" (held-out / second)" if second else "")] + (["accuracy"] if labelled else []))
    for col in [*cols, "fate"]:
        table.add_column(col, justify="left" if col in ("candidate", "precision", "fate") else "right")

    def cells(name: str, precision: str, rec: dict[str, Any] | None, fid: dict[str, Any], fate: str) -> list[str]:
        lat = (rec or {}).get("latency_ms") or {}
        speed = (rec or {}).get("speedup")
        sets = fid.get("sets") or [fid]
        row = [name, precision, f"{lat['p50']:.2f}" if lat else "-", f"{speed:.2f}x" if speed else "-",
               (" / ".join(f"{s['top1_agreement']:.4f}" for s in sets)
                + (f" ({fid['top1_agreement_decided']:.4f})" if "top1_agreement_decided" in fid else ""))
               if "top1_agreement" in fid else "-",
               " / ".join(f"{s['logits_cosine']:.5f}" for s in sets) if "logits_cosine" in fid else "-"]
        if labelled:
            row.append(f"{fid['accuracy']:.4f}" if "accuracy" in fid else "-")
        return [*row, fate]

    table.add_row(*cells("pytorch eager", "fp32", {**base, "speedup": 1.0}, base["fidelity"], "baseline"))
    for c in report["candidates"]:
        fate = {"picked": "[bold green]picked[/]", "passed": "passed", "rejected": "[yellow]rejected[/]",
                "failed": "[red]failed[/]"}.get(c["status"], c["status"])
        table.add_row(*cells(c["candidate"]["name"], c["candidate"]["precision"], c["record"], c["fidelity"], fate))
    return table


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """Hardware, installed backends and their devices, library versions."""
    from enginekit.app.inspect import doctor_report, render_doctor

    report = doctor_report()
    if as_json:
        _emit_json(report)
        return
    from rich.console import Console

    Console().print(render_doctor(report))


@cli.command()
@click.option("-o", "--output", "out", default=Path("out/demo"), show_default=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def demo(out: Path, as_json: bool) -> None:
    """The main job on the built-in digits ViT: export, compile for every
    installed backend, classify the held-out digits, and print a table."""
    from enginekit.app.demo import render_demo, run_demo

    console = _console()
    rows = run_demo(out, on_step=lambda msg: console.print(f"[dim]·[/] {msg}"))
    if as_json:
        _emit_json(rows)
    else:
        from rich.console import Console

        Console().print(render_demo(rows))


@cli.command()
@click.argument("artifacts", nargs=-1, required=True, metavar="ARTIFACT... [NAME=ARTIFACT]...")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--max-batch", default=8, show_default=True, help="Classifiers: images per engine call (1: no batching).")
@click.option("--max-delay-ms", default=5.0, show_default=True, help="Classifiers: wait this long to fill a batch.")
@click.option("--max-queue", default=64, show_default=True, help="Requests waiting per model before 503s.")
@click.option("--timeout-s", default=30.0, show_default=True, help="Answer 504 (and cancel) past this.")
@click.option("--api-key-file", type=click.Path(path_type=Path),
              help="Bearer keys, one a line: every endpoint but health then needs one.")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow this origin (CORS); repeatable.")
@click.option("--verify-with", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Public key (PEM): a model whose signature does not verify with it is not ready.")
@click.option("--max-body-mb", default=32.0, show_default=True, help="Largest request body.")
@click.option("--max-pixels", default=16_000_000, show_default=True, help="Largest uploaded image (width x height).")
@click.option("--max-images", default=16, show_default=True, help="Images per request.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, gpu.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Server processes (each loads every model).")
@click.option("--ray", "on_ray", is_flag=True, help="Serve through Ray Serve: each replica loads every model.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1, 1024), help="--ray: replicas.")
@click.option("--max-replicas", type=click.IntRange(1, 1024),
              help="--ray: autoscale from --replicas up to this many.")
@click.option("--replica-cpus", default=1.0, show_default=True, type=click.FloatRange(0, 1024),
              help="--ray: CPUs Ray reserves per replica.")
@click.option("--ray-address", metavar="HOST:PORT",
              help="--ray: a running cluster's head (default: start a local cluster).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(artifacts: tuple[str, ...], host: str, port: int, max_batch: int, max_delay_ms: float, max_queue: int,
          timeout_s: float, api_key_file: Path | None, cors_origins: tuple[str, ...], verify_with: Path | None,
          max_body_mb: float,
          max_pixels: int, max_images: int, device: str, workers: int, on_ray: bool, replicas: int,
          max_replicas: int | None, replica_cpus: float, ray_address: str | None, log_level: str) -> None:
    """Serve artifacts over HTTP: KServe v2 (/v2), /v1/classify, /v1/generate, the A1111
    API (/sdapi/v1), /metrics and a web page at /. Each artifact is served under its
    folder's name; NAME=ARTIFACT picks another; ARTIFACT@sha256:HEX pins its digest (a model that
    does not match is not ready). SIGTERM drains (finishes what is in flight).
    --ray serves the same app through Ray Serve, on --replicas replicas."""
    from enginekit.serve.settings import ServeSettings, parse_model_pins, parse_model_specs, read_api_keys

    ray_only = {"--replicas": replicas != 1, "--max-replicas": max_replicas is not None,
                "--replica-cpus": replica_cpus != 1.0, "--ray-address": ray_address is not None}
    if not on_ray and any(ray_only.values()):
        raise click.UsageError(f"{', '.join(k for k, v in ray_only.items() if v)} only go with --ray")
    if on_ray and workers != 1:
        raise click.UsageError("--workers is for one machine; with --ray, use --replicas")

    models = parse_model_specs(artifacts)
    settings = ServeSettings(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                             timeout_s=timeout_s, api_keys=read_api_keys(api_key_file) if api_key_file else frozenset(),
                             cors_origins=cors_origins, max_body_bytes=int(max_body_mb * 1024 * 1024),
                             max_pixels=max_pixels, max_images=max_images, device=device,
                             pins=parse_model_pins(artifacts), verify_with=str(verify_with.resolve()) if verify_with else None)
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(name)s: %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        click.echo(f"warning: serving on {host} without --api-key-file: anyone who reaches it can use it", err=True)
    if on_ray:
        from enginekit.serve.ray import RayOptions, serve_on_ray

        options = RayOptions(replicas=replicas, max_replicas=max_replicas, replica_cpus=replica_cpus,
                             address=ray_address)
        click.echo(f"starting Ray Serve ({'cluster ' + ray_address if ray_address else 'a local cluster'})", err=True)
        serve_on_ray(models, settings, options, host=host, port=port, on_ready=lambda m: click.echo(m, err=True))
        return
    click.echo(f"serving {', '.join(models)} on http://{host}:{port} (ready: /v2/health/ready)", err=True)
    from enginekit.serve.server import run_server

    run_server(models, settings, host=host, port=port, workers=workers, log_level=log_level)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM / SIGHUP end a command as Ctrl-C does, so the same cleanup runs (no partial
    output left behind); a second signal kills at once."""
    import signal

    signal.signal(signum, signal.SIG_DFL)
    raise KeyboardInterrupt(f"signal {signum}")


def _install_signal_handlers() -> None:
    """Route SIGTERM and SIGHUP (where not ignored, as under nohup) to :func:`_terminate`."""
    import signal

    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _terminate)


def main() -> None:
    _install_signal_handlers()
    cli(prog_name="enginekit")


if __name__ == "__main__":
    main()
