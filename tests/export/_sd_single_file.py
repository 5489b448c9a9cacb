"""Write a diffusers pipeline as an original-LDM single-file checkpoint, as A1111/sdnext keep them.

The inverse of diffusers' own single-file converters, for any block count and
``layers_per_block`` (the tiny test twins have fewer blocks than the real ones),
after diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and
..._sdxl.py. A test utility: enginekit only ever reads such files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
_OPENCLIP = (("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
             ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn.", ".attn."),
             ("text_model.final_layer_norm.", "ln_final."),
             ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
             ("text_model.embeddings.position_embedding.weight", "positional_embedding"))


def _resnet(rest: str) -> str:
    for hf, sd in _RESNET:
        rest = rest.replace(hf, sd)
    return rest


def unet_to_ldm(state: dict[str, Any], config: Any) -> dict[str, Any]:
    L = int(config.layers_per_block)
    out: dict[str, Any] = {}
    for key, value in state.items():
        head, _, tail = key.rpartition(".")  # tail: weight / bias
        parts = key.split(".")
        if head in _UNET_TOP:
            new = f"{_UNET_TOP[head]}.{tail}"
        elif parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + i * (L + 1) + int(parts[3])}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + i * (L + 1) + int(parts[3])}.1.{rest}"
            else:  # downsamplers.0.conv.*
                new = f"input_blocks.{(i + 1) * (L + 1)}.0.op.{'.'.join(parts[5:])}"
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{i * (L + 1) + int(parts[3])}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{i * (L + 1) + int(parts[3])}.1.{rest}"
            else:  # upsamplers.0.conv.*: after the attention when the block has one
                has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
                new = f"output_blocks.{i * (L + 1) + L}.{2 if has_attn else 1}.{'.'.join(parts[4:])}"
        else:
            raise KeyError(f"no LDM name for UNet weight {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, Any], config: Any) -> dict[str, Any]:
    nb = len(config.block_out_channels)
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        new = key
        if parts[1] == "down_blocks":
            i = int(parts[2])
            if parts[3] == "resnets":
                new = f"{parts[0]}.down.{i}.block.{parts[4]}.{'.'.join(parts[5:])}"
            else:
                new = f"{parts[0]}.down.{i}.downsample.{'.'.join(parts[5:])}"
        elif parts[1] == "up_blocks":
            i = nb - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"{parts[0]}.up.{i}.block.{parts[4]}.{'.'.join(parts[5:])}"
            else:
                new = f"{parts[0]}.up.{i}.upsample.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1] == "mid_block":  # attentions.0
            rest = ".".join(parts[4:])
            for hf, sd in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                           ("to_out.0.", "proj_out.")):
                rest = rest.replace(hf, sd) if rest.startswith(hf) else rest
            new = f"{parts[0]}.mid.attn_1.{rest}"
            if value.ndim == 2:  # LDM keeps these as 1x1 convolutions
                value = value.reshape(*value.shape, 1, 1)
        elif parts[1] == "conv_norm_out":
            new = f"{parts[0]}.norm_out.{parts[2]}"
        new = new.replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + new] = value
    return out


def _with_text_model(state: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5.6 flattens CLIPTextModel (no "text_model." level); LDM files keep it.
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}


def openai_clip_to_ldm(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k: v for k, v in _with_text_model(state).items() if not k.endswith("position_ids")}


def open_clip_to_ldm(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    import torch

    state = _with_text_model(state)
    out: dict[str, Any] = {}
    qkv: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f".self_attn.{proj}." in key:
                base, kind = key.split(f".self_attn.{proj}.")
                qkv.setdefault(f"{base}.{kind}", {})[proj[0]] = value
                break
        else:
            new = key
            for hf, sd in _OPENCLIP:
                new = new.replace(hf, sd)
            out[prefix + new] = value
    for base_kind, parts in qkv.items():
        base, kind = base_kind.rsplit(".", 1)
        for hf, sd in _OPENCLIP:
            base = base.replace(hf, sd)
        out[f"{prefix}{base}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def write_ldm_checkpoint(pipe: Any, family: str, path: Path) -> Path:
    """Save ``pipe``'s UNet, VAE and text encoder(s) in the original LDM layout of ``family``."""
    from safetensors.torch import save_file

    state = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config), **vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)}
    te = pipe.text_encoder.state_dict()
    if family == "sd15":
        state.update(openai_clip_to_ldm(te, "cond_stage_model.transformer."))
    elif family == "sd21":
        state.update(open_clip_to_ldm(te, "cond_stage_model.model."))
    else:
        state.update(openai_clip_to_ldm(te, "conditioner.embedders.0.transformer."))
        state.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
