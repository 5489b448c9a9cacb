"""ControlNets exported as components of a UNet pipeline artifact.

``enginekit export SRC --controlnet CN [--controlnet CN2] -o OUT`` loads each ControlNet (a
diffusers folder, ``config.json`` + safetensors, or a single ``.safetensors`` file read against
a config derived from the pipeline's UNet), checks that it was trained for this UNet (its
cross-attention width, block widths and added conditioning must be the UNet's: an SDXL
ControlNet on SD 1.5 is refused naming both), and turns the pipeline into diffusers' ControlNet
pipeline over the same components, so the whole-image check runs against
``StableDiffusion(XL)ControlNetPipeline``.

Each ControlNet exports as its own component (``controlnet``, ``controlnet_1``, ...): latents,
timestep, prompt and control image (``controlnet_cond``, RGB in [0, 1] at the image's size) in,
the residual of every down block and of the mid block out, at conditioning scale 1 (the runtime
scales and sums them). The UNet then takes those residuals as inputs (zeros when a call gives no
control image: the plain UNet's result). The manifest's ``controlnets`` and
``controlnet_residuals`` tell the runtime their names, channels and downsampling factors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from enginekit.errors import SourceError, one_line
from enginekit.manifest import TensorSpec

__all__ = ["attach_controlnets", "controlnet_names", "residual_layout", "residual_specs", "controlnet_section",
           "controlnet_plans"]


def controlnet_names(count: int) -> list[str]:
    return ["controlnet"] + [f"controlnet_{i}" for i in range(1, count)]


def _nets(pipe: Any) -> list[Any]:
    """The pipeline's ControlNets, in order (none for a plain pipeline)."""
    cn = getattr(pipe, "controlnet", None)
    if cn is None:
        return []
    return list(getattr(cn, "nets", [cn]))


def _family_by_width(width: int) -> str:
    from enginekit.export.diffusion.families import families

    found = [f.name for f in families() if f.cross_attention_dim == width]
    return found[0] if found else f"a model of cross-attention width {width}"


def _load(spec: str, unet: Any, latent_channels: int) -> Any:
    import diffusers

    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise SourceError(f"{path}: no config.json (expected a ControlNet written by save_pretrained)")
            if not list(path.glob("*.safetensors")):
                raise SourceError(f"{path}: no .safetensors weights (enginekit never unpickles)")
            return diffusers.ControlNetModel.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
        if path.is_file():
            if path.suffix != ".safetensors":
                raise SourceError(f"{path}: a single-file ControlNet must be a .safetensors file (never unpickled)")
            return _single_file(path, unet, latent_channels)
    except SourceError:
        raise
    except Exception as exc:  # diffusers raises many kinds for a file it cannot read
        raise SourceError(f"{path}: diffusers could not load the ControlNet ({one_line(exc)})") from exc
    raise SourceError(f"{spec}: no such ControlNet folder or .safetensors file")


def _single_file(path: Path, unet: Any, latent_channels: int) -> Any:
    """A single-file ControlNet (the original ``control_*.safetensors`` layout), read against the
    config of a ControlNet built from this pipeline's UNet (on the latents alone: an inpainting
    UNet's ControlNets are its base model's)."""
    import tempfile

    import diffusers

    with tempfile.TemporaryDirectory(prefix="enginekit-cn-") as tmp:
        config = dict(diffusers.ControlNetModel.from_unet(unet, load_weights_from_unet=False).config)
        config["in_channels"] = latent_channels
        diffusers.ControlNetModel.from_config(config).save_config(tmp)
        return diffusers.ControlNetModel.from_single_file(str(path), config=tmp, local_files_only=True)


def _check_fits(spec: str, cn: Any, unet: Any, family: str) -> None:
    """The ControlNet was trained for this UNet, or a one-line error naming both."""
    u, c = unet.config, cn.config
    if int(c.cross_attention_dim) != int(u.cross_attention_dim) or c.addition_embed_type != u.addition_embed_type:
        raise SourceError(f"{spec}: a ControlNet for {_family_by_width(int(c.cross_attention_dim))}, not for this "
                          f"{family} pipeline (cross-attention width {c.cross_attention_dim} against the UNet's "
                          f"{u.cross_attention_dim})")
    if tuple(c.block_out_channels) != tuple(u.block_out_channels) or int(c.layers_per_block) != int(u.layers_per_block):
        raise SourceError(f"{spec}: the ControlNet's blocks {tuple(c.block_out_channels)} x {c.layers_per_block} "
                          f"do not match the {family} UNet's {tuple(u.block_out_channels)} x {u.layers_per_block}")


def attach_controlnets(pipe: Any, family: str, specs: Sequence[str]) -> tuple[Any, list[dict[str, Any]]]:
    """diffusers' ControlNet pipeline over ``pipe``'s components and the ControlNets ``specs``
    name, with each one's provenance (source, sha256 of its weights)."""
    import diffusers

    from enginekit.artifact import sha256_file

    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise SourceError(f"ControlNets are for UNet pipelines (SD 1.x/2.x, SDXL), not {family}")
    latent = int(pipe.vae.config.latent_channels)
    # An inpainting UNet (latents + mask + masked-image latents) is steered by ControlNets of its
    # base model, which see the latents alone: diffusers' ControlNet inpainting pipelines.
    inpainting = int(unet.config.in_channels) != latent
    nets, records = [], []
    for spec in specs:
        cn = _load(spec, unet, latent).eval()
        _check_fits(spec, cn, unet, family)
        if int(cn.config.in_channels) != latent:
            raise SourceError(f"{spec}: a ControlNet takes {cn.config.in_channels} latent channels, this {family} "
                              f"pipeline's latents have {latent} (a ControlNet made from an inpainting UNet? use "
                              "one of the base model)")
        nets.append(cn)
        path = Path(spec).expanduser()
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        records.append({"source": str(path.resolve()), "weights_sha256": {f.name: sha256_file(f) for f in files}})
    xl = unet.config.addition_embed_type == "text_time"
    cls = {(False, False): diffusers.StableDiffusionControlNetPipeline,
           (True, False): diffusers.StableDiffusionXLControlNetPipeline,
           (False, True): diffusers.StableDiffusionControlNetInpaintPipeline,
           (True, True): diffusers.StableDiffusionXLControlNetInpaintPipeline}[(xl, inpainting)]
    controlnet = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    return cls.from_pipe(pipe, controlnet=controlnet), records


def residual_layout(unet_config: Any) -> list[tuple[str, int, int]]:
    """(name, channels, downsampling factor) of each residual a ControlNet gives this UNet, in
    diffusers' order: conv_in's, each down block's layers and downsampler, then the mid block's."""
    widths = list(unet_config.block_out_channels)
    out, factor = [("down_block_res_0", int(widths[0]), 1)], 1
    for i, width in enumerate(widths):
        for _ in range(int(unet_config.layers_per_block)):
            out.append((f"down_block_res_{len(out)}", int(width), factor))
        if i < len(widths) - 1:
            factor *= 2
            out.append((f"down_block_res_{len(out)}", int(width), factor))
    out.append(("mid_block_res", int(widths[-1]), factor))
    return out


def _dims(factor: int) -> tuple[str, str]:
    """The latent grid at ``factor`` (a stride-2 convolution takes a side to its half, rounded up)."""
    return ("latent_height", "latent_width") if factor == 1 else (f"latent_height_{factor}", f"latent_width_{factor}")


def residual_specs(unet_config: Any) -> list[TensorSpec]:
    return [TensorSpec(name, "float32", ("batch", ch, *_dims(f))) for name, ch, f in residual_layout(unet_config)]


def residual_feeds(unet_config: Any, batch: int, hw: tuple[int, int], gen: Any) -> list[Any]:
    """Seeded residuals for the UNet's trace and parity check, at latent size ``hw``."""
    import torch

    return [torch.randn(batch, ch, -(-hw[0] // f), -(-hw[1] // f), generator=gen) * 0.1
            for _, ch, f in residual_layout(unet_config)]


def controlnet_section(pipe: Any) -> dict[str, Any]:
    """The manifest's ``controlnets`` and ``controlnet_residuals`` (empty for a plain pipeline)."""
    nets = _nets(pipe)
    if not nets:
        return {}
    return {"controlnets": [{"component": name, "conditioning_channels": int(cn.config.conditioning_channels)}
                            for name, cn in zip(controlnet_names(len(nets)), nets)],
            "controlnet_residuals": [{"name": n, "channels": c, "factor": f}
                                     for n, c, f in residual_layout(pipe.unet.config)]}


def controlnet_plans(pipe: Any, W: dict[str, type], gen: Any, opts: Any, nbytes: Any, trace_hw: tuple[int, int],
                     check_hw: tuple[int, int], extra: list[tuple[str, tuple[Any, ...]]], extra_feeds: Any) -> list[Any]:
    """A plan factory per ControlNet: the UNet's inputs and the control image in, the residuals out."""
    import torch

    from enginekit.export.diffusion.plans import _Plan

    nets, cfg = _nets(pipe), pipe.unet.config
    f = pipe.vae_scale_factor
    D, L = int(cfg.cross_attention_dim), opts.sequence_length

    def make(name: str, cn: Any) -> Any:
        def plan() -> _Plan:
            ch, C = int(cn.config.conditioning_channels), int(cn.config.in_channels)  # C: the latents alone

            def feeds(batch: int, hw: tuple[int, int]) -> tuple[Any, ...]:
                h, w = hw
                return (torch.randn(batch, C, h, w, generator=gen), torch.rand(batch, generator=gen) * 999.0,
                        torch.randn(batch, L, D, generator=gen), torch.rand(batch, ch, h * f, w * f, generator=gen),
                        *extra_feeds(batch, hw))

            inputs = [TensorSpec("sample", "float32", ("batch", C, "latent_height", "latent_width")),
                      TensorSpec("timestep", "float32", ("batch",)),
                      TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", D)),
                      TensorSpec("controlnet_cond", "float32", ("batch", ch, "height", "width"))]
            inputs += [TensorSpec(n, "float32", s) for n, s in extra]
            return _Plan(name, W["controlnet"](cn, tuple(n for n, _ in extra)).eval(), inputs, residual_specs(cfg),
                         feeds(opts.trace_batch, trace_hw), feeds(opts.parity_batch, check_hw), nbytes(cn))
        return plan

    return [make(n, cn) for n, cn in zip(controlnet_names(len(nets)), nets)]
