"""DeepCache (Ma et al., 2023) at export: the UNet gives out the feature a cached step reuses.

DeepCache's shallowest branch (``cache_branch_id=0`` of its ``DeepCacheSDHelper``, the one the
paper and diffusers' docs use) runs, on a cached step, only the UNet's outer layers: the time
embedding, ``conv_in``, the last layer of the last up block (its last resnet, and its
transformer where it has one) and ``conv_out``. Everything deeper is replaced by the input that
last layer took at the last full step, before it was joined with its skip connection: the
output of the last up block's second-to-last layer. The exported UNet gives that tensor out
as ``deep_cache`` beside ``out_sample``; the runtime cuts the shallow graph out of the same
engine (:mod:`enginekit.runtimes.graph_cut`), so both always carry the same weights and
precision.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CACHE_OUTPUT", "cached_layer", "drop_cache_output"]

#: The UNet output a cached step reuses (and the shallow graph's extra input).
CACHE_OUTPUT = "deep_cache"


def cached_layer(unet: Any) -> Any | None:
    """The module whose output DeepCache reuses: the last up block's second-to-last transformer
    (or resnet, in a block without attention). None for a UNet without such a layer."""
    ups = getattr(unet, "up_blocks", None)
    if not ups:
        return None
    last = ups[-1]
    resnets = list(getattr(last, "resnets", None) or ())
    if len(resnets) < 2:
        return None
    attentions = list(getattr(last, "attentions", None) or ())
    if attentions:
        return attentions[-2] if len(attentions) == len(resnets) else None
    return resnets[-2]


def drop_cache_output(plan: Any) -> bool:
    """Export ``plan`` (a UNet's) without the ``deep_cache`` output; False when it has none. The
    dynamo exporter fails on that intermediate (the in-memory export traces such a UNet with
    TorchScript); a streamed export, which has only dynamo, leaves it out: DeepCache is then off."""
    if not any(o.name == CACHE_OUTPUT for o in plan.outputs):
        return False
    plan.outputs = [o for o in plan.outputs if o.name != CACHE_OUTPUT]
    plan.module.cache_layer = None
    return True
