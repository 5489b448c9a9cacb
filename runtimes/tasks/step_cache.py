"""Step caching: denoiser calls that reuse what the last full step computed.

``cache="deepcache:N"`` (DeepCache, Ma et al. 2023, its shallowest branch): every N-th step,
counted from the first step the call runs, is a full UNet call that also gives out the feature
its last up block reuses (``deep_cache``); the steps between run only the UNet's outer layers
on that feature (the UNet cut at ``deep_cache``, :mod:`enginekit.runtimes.graph_cut`). N=1
caches nothing. Opt-in: the images move (DeepCache is not exact), so a cached pipeline is
judged by the same image gate as a quantized one before ``optimize`` may pick it; the manifest's
``default_cache`` (what ``optimize`` writes for a pick it judged) is the default, else none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from enginekit.errors import InputError
from enginekit.runtimes.graph_cut import Cut

__all__ = ["StepCache", "CACHE_KINDS", "DEEPCACHE_CUT", "DEFAULT_INTERVAL", "parse_cache", "cache_name",
           "cache_interval"]

CACHE_KINDS = ("deepcache",)
#: DeepCache's interval when none is named (its authors' and diffusers' docs' example).
DEFAULT_INTERVAL = 3
MAX_INTERVAL = 100
#: The UNet cut that runs a cached step: fed the last full step's ``deep_cache``.
DEEPCACHE_CUT = Cut(inputs=("deep_cache",), outputs=("out_sample",), label="deepcache")


@dataclass(frozen=True)
class StepCache:
    kind: str
    interval: int

    def full(self, step: int) -> bool:
        """Whether the call's ``step``-th step (from 0) runs the whole denoiser."""
        return step % self.interval == 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.interval}"


def cache_name(value: Any) -> str:
    """The canonical spelling of a cache setting ("none", "deepcache:3")."""
    parsed = _parse(value)
    return str(parsed) if parsed is not None else "none"


def cache_interval(value: Any) -> int:
    """Steps per cache cycle of a cache setting: its N, 1 for none."""
    parsed = _parse(value)
    return parsed.interval if parsed is not None else 1


def _parse(value: Any) -> StepCache | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if not isinstance(value, str):
        raise InputError(f"cache must be a string such as 'deepcache:3' or 'none', got {value!r}")
    kind, _, interval = value.strip().lower().partition(":")
    if kind not in CACHE_KINDS:
        raise InputError(f"unknown cache {value!r}; use one of: none, " + ", ".join(f"{k}[:N]" for k in CACHE_KINDS))
    if not interval:
        n = DEFAULT_INTERVAL
    else:
        try:
            n = int(interval)
        except ValueError:
            raise InputError(f"cache {value!r}: the interval after ':' must be a whole number of steps") from None
    if not 1 <= n <= MAX_INTERVAL:
        raise InputError(f"cache {value!r}: the interval must be between 1 and {MAX_INTERVAL} steps")
    return None if n == 1 else StepCache(kind, n)


def parse_cache(value: Any, cfg: Any, components: Mapping[str, Any]) -> StepCache | None:
    """The call's step cache: ``value`` ("deepcache", "deepcache:N", "none"), or the manifest's
    ``default_cache`` when None; refused for a denoiser exported without the cached output."""
    if value is None:
        value = cfg.extra.get("default_cache")
    cache = _parse(value)
    if cache is None:
        return None
    comp = components.get(cfg.denoiser)
    outputs = [o.name for o in getattr(comp, "outputs", ())]
    missing = [n for n in DEEPCACHE_CUT.inputs if n not in outputs]
    if missing:
        raise InputError(f"cache {str(cache)!r} needs a UNet that gives out {missing[0]!r}: this {cfg.denoiser} "
                         f"does not (a transformer, a UNet exported with --streaming, or one exported by an older "
                         f"enginekit); use cache='none'")
    return cache
