"""TaylorSeer (``cache="taylorseer:N"``) against diffusers' own TaylorSeer hook, as its lite mode uses it.

diffusers' lite mode forecasts the output of the transformer's ``proj_out`` (the blocks return
zeros on a forecast step, and what follows ``proj_out`` is a reshape), which is the denoiser's
output forecast that OpenVINO GenAI's TaylorSeer Lite and the runtime make. The reference hooks
``proj_out`` alone (``cache_identifiers=["proj_out"]``), the forecast lite mode makes. So on the same
latents, with float32 factors and the same schedule, the images must agree to the engines'
rounding; and the cache must move the image (a cache that never forecasts would pass that).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import enginekit  # noqa: E402
from enginekit.errors import InputError  # noqa: E402
from enginekit.runtimes.tasks.step_cache import Forecast, StepCache, cache_name, split_caches  # noqa: E402

from ..conftest import backend_params, psnr, twin_cache  # noqa: E402

SIZE = 64
PROMPT = "a lighthouse at dusk"
STEPS = 8
#: name -> (unpacked latent shape at SIZE, the call's own arguments)
CALLS = {
    "tiny-sd3": ((1, 16, SIZE // 8, SIZE // 8), dict(negative_prompt="blurry", guidance_scale=5.0,
                                                      max_sequence_length=32)),
    "tiny-flux": ((1, (SIZE // 16) ** 2, 64), dict(guidance_scale=3.5, max_sequence_length=64)),
}

_twin = twin_cache()


def _reference(name: str, latents: np.ndarray, config: object | None) -> np.ndarray:
    from diffusers.hooks import HookRegistry, apply_taylorseer_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    pipe = _twin(name)
    if config is not None:  # fresh hooks (fresh state) per call
        apply_taylorseer_cache(pipe.transformer, config)
        # The transformer's registry lists its children's once (an uncached call made it without this hook).
        HookRegistry.check_if_exists_or_initialize(pipe.transformer)._child_registries_cache = None
        # diffusers' SD3 pipeline opens no cache context itself (pipelines of CacheMixin models do)
        _set_cache_context(pipe.transformer, CacheContext("reference"))
    try:
        with torch.inference_mode():
            return pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=torch.from_numpy(latents),
                        output_type="np", **CALLS[name][1]).images
    finally:
        if config is not None:
            HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook("taylorseer_cache", recurse=True)


def _config(interval: int, before: int, order: int, after: int | None = None):
    # Lite mode's forecast alone: proj_out cached, the blocks left to run (lite mode's zeros from the
    # blocks are discarded anyway, and break on SD3's last block, which gives out None).
    return diffusers.TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=before,
                                           disable_cache_after_step=after, max_order=order,
                                           taylor_factors_dtype=torch.float32, cache_identifiers=["proj_out"])


@pytest.mark.parametrize("kind", backend_params("onnx"))
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_taylorseer_matches_diffusers_lite_mode(tiny_pipelines: dict, name: str, kind: str) -> None:
    pipe = enginekit.load(tiny_pipelines[(name, kind)], device="cpu")
    shape, call = CALLS[name]
    latents = np.random.default_rng(3).standard_normal(shape, dtype=np.float32)
    full_ref = _reference(name, latents, None)
    assert full_ref.std() > 0.02
    for spelled, (interval, before, order) in (("taylorseer:2,before=2", (2, 2, 1)),
                                               ("taylorseer:3,order=2", (3, 3, 2))):
        got = pipe(PROMPT, latents=latents, num_inference_steps=STEPS, height=SIZE, width=SIZE, cache=spelled,
                   output_type="np", **call)
        assert got.cache == spelled
        ref = _reference(name, latents, _config(interval, before, order))
        close = psnr(ref, got.images)
        assert close >= 40.0, f"{name} {kind} {spelled}: {close:.1f} dB from diffusers' TaylorSeer"
        moved = psnr(full_ref, ref)
        assert moved < close - 6, f"{spelled} changed nothing measurable ({moved:.1f} dB)"
    # after=: the last steps run in full again, as diffusers' disable_cache_after_step does.
    got = pipe(PROMPT, latents=latents, num_inference_steps=STEPS, height=SIZE, width=SIZE,
               cache="taylorseer:2,before=2,after=6", output_type="np", **call).images
    assert psnr(_reference(name, latents, _config(2, 2, 1, after=6)), got) >= 40.0
    pipe.close()


def test_the_schedule_and_the_forecast() -> None:
    """Which steps run in full (diffusers' rule; GenAI's negative ``after``) and the Taylor arithmetic."""
    ts = StepCache("taylorseer", 3, before=2)
    assert [ts.full(i, 10) for i in range(10)] == [True, True, False, True, False, False, True, False, False, True]
    tail = StepCache("taylorseer", 3, before=2, after=-2)
    assert [tail.full(i, 10) for i in range(10)][-3:] == [False, True, True]
    deep = StepCache("deepcache", 3)
    assert [deep.full(i, 7) for i in range(7)] == [True, False, False, True, False, False, True]
    f = Forecast(order=2)
    for step in (0, 1, 2):  # a quadratic in the step: order 2 extrapolates it exactly
        f.update(step, np.full(4, 1.0 + 2 * step + 0.5 * step * step, dtype=np.float32))
    # diffusers' rule, backward differences: y2 + (y2 - y1) + ((y2 - y1) - (y1 - y0)) / 2 = 7 + 3.5 + 0.5
    # (the exact quadratic would say 11.5)
    assert np.allclose(f.predict(3), 11.0, atol=1e-5)
    g = Forecast(order=1)
    g.update(0, np.zeros(2, np.float32))
    g.update(2, np.full(2, 4.0, np.float32))
    assert np.allclose(g.predict(3), 6.0)


@pytest.mark.parametrize("value, message", [
    ("taylorseer:2,before=0", "between 1 and"), ("taylorseer:2,order=9", "between 0 and"),
    ("taylorseer:2,speed=3", "unknown option"), ("deepcache:2,before=2", "deepcache takes only its interval"),
    ("taylorseer:2,before=2,before=3", "given twice"), ("taylorseer:2,after=x", "whole number"),
])
def test_bad_taylorseer_values_are_refused_before_any_engine_runs(tiny_pipelines: dict, value: str,
                                                                   message: str) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd3", "onnx")], device="cpu")
    with pytest.raises(InputError, match=message):
        pipe("a cat", num_inference_steps=2, height=SIZE, width=SIZE, cache=value)
    assert pipe.components.loaded == ()


def test_canonical_names() -> None:
    assert cache_name("TaylorSeer") == "taylorseer:3"
    assert cache_name("taylorseer:2, order=1, before=3") == "taylorseer:2"
    assert cache_name("taylorseer:2,after=-2,before=6") == "taylorseer:2,before=6,after=-2"
    assert cache_name("taylorseer:1") == "none"
    assert split_caches("taylorseer:2, before=2,deepcache:3,,none") == ["taylorseer:2,before=2", "deepcache:3", "none"]


def test_a_unet_pipeline_takes_taylorseer_and_the_next_call_is_uncached(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    latents = np.random.default_rng(0).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    kwargs = dict(num_inference_steps=6, height=SIZE, width=SIZE, latents=latents, output_type="np")
    plain = pipe("a cat", **kwargs).images
    cached = pipe("a cat", cache="taylorseer:2,before=2", **kwargs).images
    assert np.isfinite(cached).all() and not np.array_equal(plain, cached)
    assert np.array_equal(pipe("a cat", **kwargs).images, plain)
