"""``generate`` and ``predict``: the commands that run an artifact."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from rich.markup import escape

from enginekit.app import render
from enginekit.app.cli.common import DEVICE_HELP, Params, cli, emit_json, err_console, given_params

# generate's parameters that are not pipeline call arguments.
_NOT_CALL = ("artifact", "prompt", "out", "init_image", "device", "backend", "as_json", "digest", "verify_with",
             "low_memory", "verbose", "lora", "control_map")


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Image file to write (.png, .jpg, .webp); several images get -1, -2, ... before the suffix.")
@click.option("--negative", default=None, help="Negative prompt.")
@click.option("--steps", type=int, default=None,
              help="Denoising steps (default: the model's own, from its manifest).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale, 1 turns CFG off (default: the model's own, from its "
                   "manifest).")
@click.option("--seed", type=int, default=None, help="Seed for numpy's generator (printed when omitted).")
@click.option("--height", type=int, help="Image height: a multiple of 8 (16 for SD3 and FLUX) [default: the model's size].")
@click.option("--width", type=int, help="Image width: a multiple of 8 (16 for SD3 and FLUX) [default: the model's size].")
@click.option("--scheduler", type=click.Choice(["euler", "euler-a", "ddim", "dpm++2m", "dpm++2m-karras", "lcm",
                                                "flow-euler"]),
              default=None, help="Sampler (default: the pipeline's own where ported, else euler; SD3: flow-euler).")
@click.option("--max-sequence-length", type=int, default=None,
              help="SD3, FLUX: T5 prompt tokens (SD3 default 256; FLUX dev 512, schnell 256; at most 512).")
@click.option("--true-cfg", "true_cfg", type=float, default=None,
              help="FLUX: true CFG scale (> 1, with --negative: a second pass on the negative prompt).")
@click.option("--cache", default=None,
              help="Step cache: deepcache[:N] (UNet pipelines: every N-th step runs the whole UNet, the ones "
                   "between reuse its deep features), taylorseer[:N] (any pipeline: after 3 full steps one in N "
                   "runs the denoiser, the others forecast its output; taylorseer:N,before=B,after=A,order=K) "
                   "or none; faster, the image moves [default: the artifact's own, which optimize sets for a "
                   "cached pick, else none].")
@click.option("--init-image", type=click.Path(path_type=Path), help="Image-to-image: start from this picture.")
@click.option("--strength", type=float, default=None,
              help="Image-to-image: how much of --init-image to repaint (0-1] [default: 0.8; 1.0 with --mask].")
@click.option("--mask", "mask_image", type=click.Path(path_type=Path),
              help="Inpainting: repaint --init-image where this mask is white (any size: resized to the image's); "
                   "an inpainting model runs as diffusers' inpainting pipeline, any other keeps the unmasked region.")
@click.option("--padding-mask-crop", type=int, default=None,
              help="Inpainting: generate only the mask's bounding box grown by this many pixels (at --height x "
                   "--width) and paste it back into the full image.")
@click.option("--control-image", "control_image", multiple=True, type=click.Path(path_type=Path),
              help="ControlNet: the control image (edges, pose, depth map), one per ControlNet the artifact holds, "
                   "in order; its size is the output's unless --height/--width say otherwise.")
@click.option("--control-map", "control_map", multiple=True, metavar="none|canny[:LOW,HIGH]",
              help="ControlNet: make the control map from --control-image (a photo) first; one, or one per "
                   "--control-image in order. canny is OpenCV's Canny [default thresholds 100,200].")
@click.option("--controlnet-scale", "controlnet_conditioning_scale", multiple=True, type=float,
              help="ControlNet: conditioning scale, one, or one per ControlNet [default: 1.0].")
@click.option("--control-start", "control_guidance_start", multiple=True, type=float,
              help="ControlNet: the fraction of the steps where it starts [default: 0.0].")
@click.option("--control-end", "control_guidance_end", multiple=True, type=float,
              help="ControlNet: the fraction of the steps where it stops [default: 1.0].")
@click.option("--lora", multiple=True, metavar="FILE[:SCALE]",
              help="Apply a LoRA file (.safetensors; diffusers/PEFT or kohya) for this run at SCALE [default 1.0]; "
                   "repeat for several. No new export: the artifact's weights are patched at load.")
@click.option("--num-images", default=1, show_default=True, help="Images for the prompt.")
@click.option("-d", "--device", default="auto", show_default=True, help=DEVICE_HELP + ".")
@click.option("--backend", help="Backend to run on (default: the one the artifact was built for).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@click.option("--digest", help="Refuse the artifact unless its manifest digest (see `enginekit inspect`) is this.")
@click.option("--verify-with", type=click.Path(path_type=Path),
              help="Refuse the artifact unless its signature (`enginekit sign`) verifies with this public key.")
@click.option("--low-memory", is_flag=True,
              help="Open each component only for its step and close it after (text encoders once the prompt is "
                   "encoded, the denoiser before the VAE decodes), with the backend's memory-lean settings: "
                   "less memory, slower; the same image.")
@click.option("-v", "--verbose", is_flag=True,
              help="Log what enginekit decides and print each step's peak resident memory at the end.")
def generate(**params: Any) -> None:
    """Generate images for PROMPT with a text-to-image ARTIFACT (torch-free)."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from enginekit.app.build import generate_images
    from enginekit.memory import StagePeaks

    ctx = click.get_current_context()
    o = Params(params)
    verbose = o.verbose or bool(ctx.find_root().params.get("verbose"))  # `enginekit -v generate` too
    if o.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    stages = StagePeaks() if verbose else None
    for name, flag in (("strength", "--strength"), ("mask_image", "--mask"), ("padding_mask_crop", "--padding-mask-crop")):
        if params.get(name) is not None and o.init_image is None:
            raise click.UsageError(f"{flag} is for image-to-image and inpainting: give --init-image too")
    if o.control_map and not o.control_image:
        raise click.UsageError("--control-map makes the control map from a photo: give it with --control-image")
    if o.padding_mask_crop is not None and o.mask_image is None:
        raise click.UsageError("--padding-mask-crop crops around the mask: give --mask too")
    started = time.perf_counter()
    with Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console(), transient=True, disable=o.as_json) as progress:
        bar = progress.add_task("denoising", total=None)

        def on_step(step: int, t: float, latents: Any) -> None:
            progress.update(bar, completed=step + 1, total=max(step + 1, progress.tasks[0].total or 0))

        # Unset values stay unset: the pipeline reads the model's own defaults from its manifest.
        names = {"negative": "negative_prompt", "steps": "num_inference_steps", "guidance": "guidance_scale",
                 "num_images": "num_images_per_prompt", "true_cfg": "true_cfg_scale"}
        call = {names.get(k, k): v for k, v in given_params(ctx, exclude=_NOT_CALL).items()}
        if "control_image" in call and o.control_map:
            from enginekit.runtimes.control_maps import apply_control_maps

            call["control_image"] = tuple(apply_control_maps(call["control_image"], o.control_map, "--control-map"))
        for key in ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"):
            if key in call:  # repeatable: one value, or one per ControlNet
                call[key] = list(call[key]) if len(call[key]) > 1 else call[key][0]
        if o.lora:
            from enginekit.runtimes.tasks.lora import parse_lora_arg

            call["loras"] = dict(parse_lora_arg(text) for text in o.lora)
        paths, result = generate_images(o.artifact, o.prompt, o.out, device=o.device, backend=o.backend,
                                        digest=o.digest, verify_with=o.verify_with, init_image=o.init_image,
                                        on_step=on_step, low_memory=o.low_memory, stages=stages, **call)
    elapsed = time.perf_counter() - started
    if o.as_json:
        report = {"images": [str(p) for p in paths], "seed": result.seed, "steps": len(result.timesteps),
                  "cache": getattr(result, "cache", "none"), "seconds": round(elapsed, 3)}
        if stages is not None:
            report["peak_rss_bytes"] = {s.name: s.bytes for s in stages.stages.values()}
        emit_json(report)
        return
    cache = getattr(result, "cache", "none")
    err_console().print(f"[green]wrote[/] {escape(', '.join(map(str, paths)))}  (seed {result.seed}, "
                     f"{len(result.timesteps)} steps{'' if cache == 'none' else ', cache ' + cache}, {elapsed:.1f} s)")
    if stages is not None:
        err_console().print(stages.line(), highlight=False)


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
@click.option("-d", "--device", default="auto", show_default=True, help=DEVICE_HELP + ".")
@click.option("--backend", "-b",
              help="Backend to run on (default: the one the artifact was built for; an exported ONNX artifact "
                   "also runs on openvino, no compile step).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--skip-bad", is_flag=True,
              help="Skip files that are not readable images (listed at the end) instead of stopping at the first.")
@click.option("--digest", help="Refuse the artifact unless its manifest digest (see `enginekit inspect`) is this.")
@click.option("--verify-with", type=click.Path(path_type=Path),
              help="Refuse the artifact unless its signature (`enginekit sign`) verifies with this public key.")
@click.option("--explain", "explain_dir", type=click.Path(path_type=Path), metavar="OUTDIR",
              help="Also write where the model looked: OUTDIR/<name>_explain.png, the image with a heatmap over "
                   "the part the model saw (see --explain-method).")
@click.option("--explain-method", type=click.Choice(["rollout", "occlusion"]), default="rollout", show_default=True,
              help="rollout: attention rollout, read from the engine's own attention (ViTs); occlusion: the "
                   "score drop as a grey square slides over the image (any classifier, one run per square).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON array, one object per image in order: image, label, index, score, top_k, and "
                   "explanation (the overlay's path) with --explain (with --skip-bad, a skipped file's object has "
                   "image and error instead).")
def predict(**params: Any) -> None:
    """Classify IMAGES (files or folders) with an ARTIFACT."""
    from enginekit.app.classify import ClassifyOptions, classify_files

    o = Params(params)
    found = classify_files(o.artifact, o.images, ClassifyOptions(
        top_k=o.top_k, device=o.device, backend=o.backend, batch_size=o.batch_size, skip_bad=o.skip_bad,
        digest=o.digest, verify_with=o.verify_with, explain_dir=o.explain_dir, explain_method=o.explain_method))
    if o.as_json:
        data = [{"image": str(p), "error": err} if err is not None else
                {"image": str(p), **pred.to_dict(),
                 **({"explanation": str(found.overlays[p])} if p in found.overlays else {})}
                for p, pred, err in found.results]
        click.echo(json.dumps(_finite(data), indent=2, allow_nan=False))
    else:
        # Piped output has no terminal width: whole paths, never folded mid-name.
        render.stdout_console().print(render.predict_table(f"{o.artifact} on {found.engine}", found.results, o.top_k))
        if found.overlays:
            click.echo(f"wrote {len(found.overlays)} {o.explain_method} overlay(s) to {o.explain_dir}", err=True)
    if found.bad:
        click.echo(f"skipped {len(found.bad)} of {len(found.results)} file(s), not readable images:", err=True)
        for _, err in found.bad:
            click.echo(f"  {err}", err=True)
