"""Step caching: denoiser calls that reuse what the last full step computed.

``cache="deepcache:N"`` (DeepCache, Ma et al. 2023, its shallowest branch): every N-th step,
counted from the first step the call runs, is a full UNet call that also gives out the feature
its last up block reuses (``deep_cache``); the steps between run only the UNet's outer layers
on that feature (the UNet cut at ``deep_cache``, :mod:`enginekit.runtimes.graph_cut`). N=1
caches nothing. Opt-in: the images move (DeepCache is not exact), so a cached pipeline is
judged by the same image gate as a quantized one before ``optimize`` may pick it; the manifest's
``default_cache`` (what ``optimize`` writes for a pick it judged) is the default, else none.

``cache="taylorseer:N"`` (TaylorSeer Lite, Liu et al. 2025, as diffusers' ``TaylorSeerCacheConfig(
use_lite_mode=True)`` and OpenVINO GenAI run it): any denoiser, UNet or transformer. The first
``before`` steps (default 3) run the whole denoiser; after them, one step in N does (the
``before + 1``-th, then every N-th), and the others forecast the denoiser's output from the last
full steps' outputs with a Taylor series of ``order`` (default 1: the last output plus its
change per step times the steps since). ``after=A`` runs every step from step A on (a negative A
counts from the end, as GenAI's ``disable_cache_after_step``). Spelled
``taylorseer:N,before=B,after=A,order=K``; the forecast is exact arithmetic on the outputs, so
it needs nothing from the export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from enginekit.errors import InputError
from enginekit.runtimes.graph_cut import Cut

__all__ = ["StepCache", "CACHE_KINDS", "DEEPCACHE_CUT", "DEFAULT_INTERVAL", "Forecast", "parse_cache",
           "cache_name", "cache_interval", "cache_offset", "split_caches"]

CACHE_KINDS = ("deepcache", "taylorseer")
#: The interval when none is named (DeepCache's authors' example; GenAI's TaylorSeer default).
DEFAULT_INTERVAL = 3
MAX_INTERVAL = 100
#: TaylorSeer's full steps before caching starts (diffusers' ``disable_cache_before_step``).
DEFAULT_BEFORE = 3
MAX_ORDER = 4
#: The UNet cut that runs a cached step: fed the last full step's ``deep_cache``.
DEEPCACHE_CUT = Cut(inputs=("deep_cache",), outputs=("out_sample",), label="deepcache")


@dataclass(frozen=True)
class StepCache:
    kind: str
    interval: int
    before: int = DEFAULT_BEFORE  # taylorseer only
    after: int | None = None
    order: int = 1

    def full(self, step: int, steps: int) -> bool:
        """Whether the ``step``-th step (from 0) of a call that runs ``steps`` runs the whole denoiser."""
        if self.kind == "deepcache":
            return step % self.interval == 0
        if step < self.before or (step - self.before - 1) % self.interval == 0:
            return True
        if self.after is not None:
            return step >= (self.after if self.after >= 0 else steps + self.after)
        return False

    def __str__(self) -> str:
        extra = "" if self.kind == "deepcache" else "".join(
            f",{k}={v}" for k, v, default in (("before", self.before, DEFAULT_BEFORE), ("after", self.after, None),
                                              ("order", self.order, 1)) if v != default)
        return f"{self.kind}:{self.interval}{extra}"


class Forecast:
    """TaylorSeer's forecast of the denoiser's output (float32 factors, diffusers' update rule):
    each full step's output replaces factor 0, and factor k+1 becomes (new factor k - old
    factor k) / steps between the two updates, up to ``order``; a cached step at distance d from
    the last update returns sum_k factor_k * d**k / k!."""

    def __init__(self, order: int) -> None:
        self.order, self.factors, self.last = order, [], None

    def update(self, step: int, output: np.ndarray) -> None:
        new = [np.asarray(output, dtype=np.float32)]
        if self.last is not None:
            delta = np.float32(step - self.last)
            for k in range(min(self.order, len(self.factors))):
                if self.factors[k].shape != new[k].shape:
                    break
                new.append((new[k] - self.factors[k]) / delta)
        self.factors, self.last = new, step

    def predict(self, step: int) -> np.ndarray:
        if self.last is None:
            raise RuntimeError("TaylorSeer: a forecast before any full step")
        d = step - self.last
        out = np.zeros_like(self.factors[0])
        for k, factor in enumerate(self.factors):
            out = out + factor * np.float32(d ** k / math.factorial(k))
        return out


def split_caches(text: str) -> list[str]:
    """A comma-separated list of cache settings, a setting's ``key=value`` options kept with it
    ("taylorseer:2,before=2,deepcache:3" is two settings)."""
    out: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if "=" in item and out:
            out[-1] += "," + item
        elif item:
            out.append(item)
    return out


def cache_name(value: Any) -> str:
    """The canonical spelling of a cache setting ("none", "deepcache:3", "taylorseer:2,before=2")."""
    parsed = _parse(value)
    return str(parsed) if parsed is not None else "none"


def cache_interval(value: Any) -> int:
    """Steps per cache cycle of a cache setting: its N, 1 for none."""
    parsed = _parse(value)
    return parsed.interval if parsed is not None else 1


def cache_offset(value: Any) -> int:
    """The step after which whole cycles run (each holding one full step): 0, or TaylorSeer's
    ``before`` (its first steps all run in full)."""
    parsed = _parse(value)
    return parsed.before if parsed is not None and parsed.kind == "taylorseer" else 0


def _whole(value: str, key: str, text: str, low: int, high: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise InputError(f"cache {value!r}: {key} must be a whole number, got {text!r}") from None
    if not low <= n <= high:
        raise InputError(f"cache {value!r}: {key} must be between {low} and {high}")
    return n


def _parse(value: Any) -> StepCache | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if not isinstance(value, str):
        raise InputError(f"cache must be a string such as 'deepcache:3', 'taylorseer:2' or 'none', got {value!r}")
    head, *options = value.strip().lower().split(",")
    kind, _, interval = head.partition(":")
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
    fields: dict[str, Any] = {}
    for option in options:
        key, eq, text = option.strip().partition("=")
        if kind != "taylorseer" or key not in ("before", "after", "order") or not eq:
            raise InputError(f"cache {value!r}: unknown option {option.strip()!r}"
                             + ("; taylorseer takes before=B, after=A, order=K" if kind == "taylorseer"
                                else f"; {kind} takes only its interval"))
        if key in fields:
            raise InputError(f"cache {value!r}: {key} is given twice")
        fields[key] = (_whole(value, key, text, 1, 1000) if key == "before" else
                       _whole(value, key, text, -1000, 1000) if key == "after" else
                       _whole(value, key, text, 0, MAX_ORDER))
    return None if n == 1 else StepCache(kind, n, **fields)


def parse_cache(value: Any, cfg: Any, components: Mapping[str, Any]) -> StepCache | None:
    """The call's step cache: ``value`` ("deepcache:N", "taylorseer:N,...", "none"), or the
    manifest's ``default_cache`` when None; DeepCache is refused for a denoiser exported without
    the cached output."""
    if value is None:
        value = cfg.extra.get("default_cache")
    cache = _parse(value)
    if cache is None or cache.kind != "deepcache":
        return cache
    comp = components.get(cfg.denoiser)
    outputs = [o.name for o in getattr(comp, "outputs", ())]
    missing = [n for n in DEEPCACHE_CUT.inputs if n not in outputs]
    if missing:
        raise InputError(f"cache {str(cache)!r} needs a UNet that gives out {missing[0]!r}: this {cfg.denoiser} "
                         f"does not (a transformer, a UNet exported with --streaming, or one exported by an older "
                         f"enginekit); use cache='taylorseer:N' or 'none'")
    return cache
