"""The torch modules each diffusion component is traced through: named inputs and outputs, and
diffusers' calls made export-friendly (built on use, so importing this imports no torch)."""

from __future__ import annotations

import types
from typing import Any

__all__ = ["_wrappers"]


def _wrappers() -> dict[str, type]:
    """Each component's wrapper class, by plan name (torch is imported here, on use)."""
    return {**_encoder_and_unet_wrappers(), **_transformer_and_vae_wrappers()}


def _encoder_and_unet_wrappers() -> dict[str, type]:
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
            pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
            return out.last_hidden_state, out.hidden_states[-2], pooled

    class UNet(torch.nn.Module):
        """``out_sample``, and with ``cache_layer`` that layer's output too (DeepCache's reused
        feature, :mod:`enginekit.export.diffusion.deepcache`)."""

        def __init__(self, unet: Any, extra: tuple[str, ...], cache_layer: Any = None, residuals: int = 0) -> None:
            super().__init__()
            self.unet = unet
            self.extra = extra
            self.cache_layer = cache_layer
            self.residuals = residuals  # a ControlNet pipeline's UNet: its down and mid residuals as inputs

        def forward(self, sample, timestep, encoder_hidden_states, *rest):  # type: ignore[no-untyped-def]
            named = dict(zip(self.extra, rest))
            added = {"text_embeds": named["text_embeds"], "time_ids": named["time_ids"]} if "time_ids" in named else None
            if self.residuals:
                res = rest[len(self.extra):]
                return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=named.get("timestep_cond"),
                                 added_cond_kwargs=added, down_block_additional_residuals=tuple(res[:-1]),
                                 mid_block_additional_residual=res[-1], return_dict=False)[0]
            if self.cache_layer is None:
                return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=named.get("timestep_cond"),
                                 added_cond_kwargs=added, return_dict=False)[0]
            seen: list[Any] = []
            hook = self.cache_layer.register_forward_hook(
                lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
            try:
                out = self.unet(sample, timestep, encoder_hidden_states, timestep_cond=named.get("timestep_cond"),
                                added_cond_kwargs=added, return_dict=False)[0]
            finally:
                hook.remove()
            return out, seen[-1]

    class T5Encoder(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.encoder(input_ids, return_dict=False)[0]

    class ControlNet(torch.nn.Module):
        """Every residual a ControlNet gives, at conditioning scale 1 (the runtime scales them)."""

        def __init__(self, controlnet: Any, extra: tuple[str, ...]) -> None:
            super().__init__()
            self.controlnet = controlnet
            self.extra = extra

        def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *rest):  # type: ignore[no-untyped-def]
            named = dict(zip(self.extra, rest))
            added = {"text_embeds": named["text_embeds"], "time_ids": named["time_ids"]} if "time_ids" in named else None
            down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                                        timestep_cond=named.get("timestep_cond"), added_cond_kwargs=added,
                                        return_dict=False)
            return (*down, mid)

    return {"text": TextEncoder, "t5": T5Encoder, "unet": UNet, "controlnet": ControlNet}


def _transformer_and_vae_wrappers() -> dict[str, type]:
    import torch

    def tensor_crop(self: Any, height: Any, width: Any) -> torch.Tensor:
        """diffusers' PatchEmbed.cropped_pos_embed, the centre offsets computed on tensors: as
        shape arithmetic, torch.export folds ``(max - h) // 2`` into a form that is one row off
        for an odd patch grid (the graph then fails or silently shifts the embedding)."""
        size = self.pos_embed_max_size
        grid = self.pos_embed.reshape(1, size, size, -1)
        for axis, side in ((1, height // self.patch_size), (2, width // self.patch_size)):
            start = torch.div(torch.full((), size, dtype=torch.int64) - torch.full((), side, dtype=torch.int64),
                              2, rounding_mode="floor")
            grid = grid.index_select(axis, torch.arange(side, dtype=torch.int64) + start)
        return grid.reshape(1, -1, grid.shape[-1])

    class Transformer(torch.nn.Module):
        def __init__(self, transformer: Any) -> None:
            super().__init__()
            self.transformer = transformer
            embed = getattr(transformer, "pos_embed", None)
            if getattr(embed, "pos_embed_max_size", None):  # same numbers, an exportable crop
                embed.cropped_pos_embed = types.MethodType(tensor_crop, embed)

        def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):  # type: ignore[no-untyped-def]
            return self.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                    pooled_projections=pooled_projections, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(latent_sample, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            return self.vae.encode(sample).latent_dist.parameters

    class FluxTransformer(torch.nn.Module):
        def __init__(self, transformer: Any) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, sample, timestep, encoder_hidden_states, pooled_projections, txt_ids, img_ids,
                    guidance=None):  # type: ignore[no-untyped-def]
            return self.transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                    pooled_projections=pooled_projections, txt_ids=txt_ids, img_ids=img_ids,
                                    guidance=guidance, return_dict=False)[0]

    return {"transformer": Transformer, "flux": FluxTransformer, "vae_decoder": VaeDecoder, "vae_encoder": VaeEncoder}
