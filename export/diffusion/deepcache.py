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

from pathlib import Path
from typing import Any, Callable, TypeVar

from enginekit.errors import ExportError

T = TypeVar("T")

__all__ = ["CACHE_OUTPUT", "cached_layer", "drop_cache_output", "streamed_with_cache_fallback"]

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
    """Export ``plan`` (a UNet's) without the ``deep_cache`` output; False when it has none."""
    if not any(o.name == CACHE_OUTPUT for o in plan.outputs):
        return False
    plan.outputs = [o for o in plan.outputs if o.name != CACHE_OUTPUT]
    plan.module.cache_layer = None
    return True


def streamed_with_cache_fallback(export: Callable[[], T], plan: Any, folder: Path, say: Callable[[str], None]) -> T:
    """``export()``, and where the dynamo exporter cannot give out ``deep_cache`` (it fails on that
    intermediate of some UNets, where the in-memory export falls back to TorchScript, which a
    streamed export has not), once more without it: the UNet then exports, and DeepCache is off
    for it (a cached call says so in one line)."""
    try:
        return export()
    except ExportError:
        if not drop_cache_output(plan):
            raise
    say(f"traced again without the {CACHE_OUTPUT} output (torch.export cannot give it out): DeepCache is off")
    for stale in folder.iterdir():
        stale.unlink()
    return export()
