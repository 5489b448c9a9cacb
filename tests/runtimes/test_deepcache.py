"""DeepCache (``cache="deepcache:N"``) against a hand-written PyTorch reference of the same rule.

The reference is DeepCache's ``DeepCacheSDHelper`` rule at ``cache_branch_id=0`` written out on
diffusers' own pipeline: on a step whose index (in the scheduler's timesteps) is not a multiple
of N, every down block, the mid block, every up block but the last, and the last up block's
layers but its last one return what they returned at the last full step; ``conv_in``, the time
embedding, the last layer and ``conv_out`` run. The runtime does the same with a UNet graph cut
at its ``deep_cache`` output, so the two must give the same image; caching must also move the
image (a cache that never skips would pass the first check).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import enginekit  # noqa: E402
from enginekit.errors import InputError  # noqa: E402

from ..conftest import backend_params, diffusers_twin, psnr  # noqa: E402

SIZE = 64
PROMPTS = ["a lighthouse at dusk", "a red bicycle leaning on a wall"]
STEPS = 7

_twins: dict[str, object] = {}


def _pipe(name: str):
    if name not in _twins:
        pipe = diffusers_twin(name)
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        _twins[name] = pipe
    return _twins[name]


class _DeepCacheReference:
    """DeepCacheSDHelper's uniform rule at branch 0, on a diffusers pipeline's UNet (hand-written)."""

    def __init__(self, pipe, interval: int) -> None:
        self.pipe, self.interval = pipe, interval
        unet = pipe.unet
        last = unet.up_blocks[-1]
        self.cached = [*unet.down_blocks, unet.mid_block, *unet.up_blocks[:-1], *last.resnets[:-1],
                       *(last.attentions[:-1] if getattr(last, "attentions", None) else [])]
        self.saved: dict[int, object] = {}
        self.originals: list[tuple[object, object]] = []
        self.step = 0

    def __enter__(self):
        unet_forward = self.pipe.unet.forward

        def counting(*args, **kwargs):
            self.step = list(self.pipe.scheduler.timesteps).index(args[1].item())
            return unet_forward(*args, **kwargs)

        self.originals.append((self.pipe.unet, unet_forward))
        self.pipe.unet.forward = counting
        for module in self.cached:
            self.originals.append((module, module.forward))
            module.forward = self._wrap(module, module.forward)
        return self

    def _wrap(self, module, forward):
        def wrapped(*args, **kwargs):
            if self.step % self.interval == 0:
                self.saved[id(module)] = forward(*args, **kwargs)
            return self.saved[id(module)]
        return wrapped

    def __exit__(self, *exc) -> None:
        for module, forward in self.originals:
            module.forward = forward


def _latents(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


def _reference(name: str, latents: np.ndarray, interval: int | None) -> np.ndarray:
    pipe = _pipe(name)
    with torch.inference_mode():
        if interval is None:
            return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                        latents=torch.from_numpy(latents), output_type="np").images
        with _DeepCacheReference(pipe, interval):
            return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                        latents=torch.from_numpy(latents), output_type="np").images


@pytest.mark.parametrize("kind", backend_params())  # each backend's compiled engine, cut by that backend
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_deepcache_matches_the_reference_rule(tiny_pipelines: dict, name: str, kind: str) -> None:
    pipe = enginekit.load(tiny_pipelines[(name, kind)], device="cpu")
    latents = _latents(len(PROMPTS))
    kwargs = dict(num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE, scheduler="euler",
                  output_type="np")
    got = pipe(PROMPTS, latents=latents, cache="deepcache:3", **kwargs).images
    ref = _reference(name, latents, 3)
    full_ref = _reference(name, latents, None)
    assert ref.std() > 0.02
    assert psnr(ref, got) >= 40.0, f"{name} {kind}: {psnr(ref, got):.1f} dB from the reference rule"
    # Caching moved the image, by far more than the engine's own distance from the rule.
    moved = psnr(full_ref, ref)
    assert moved < psnr(ref, got) - 6, f"the cache changed nothing measurable ({moved:.1f} dB)"
    # The shallow engine ran, beside the UNet; an interval of 1 is the uncached pipeline.
    assert "unet#deepcache" in pipe.components.loaded
    same = pipe(PROMPTS, latents=latents, cache="deepcache:1", **kwargs).images
    plain = pipe(PROMPTS, latents=latents, **kwargs).images
    assert np.array_equal(same, plain)
    pipe.close()


def test_deepcache_counts_from_the_first_step_run(tiny_pipelines: dict) -> None:
    """Image-to-image starts part-way down the schedule: its first step is a full one (nothing
    is cached yet), and a cancelled call leaves the next one working."""
    from ..conftest import make_photo

    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    image = make_photo((SIZE, SIZE), 3)
    out = pipe("a cat", image=image, strength=0.5, num_inference_steps=8, seed=1, cache="deepcache:4",
               output_type="np").images
    assert out.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()

    def stop(step, t, latents):
        return step < 1

    from enginekit.runtimes.tasks.text_to_image import GenerationCancelled

    with pytest.raises(GenerationCancelled):
        pipe("a cat", num_inference_steps=6, height=SIZE, width=SIZE, seed=1, cache="deepcache:2", callback=stop)
    again = pipe("a cat", num_inference_steps=6, height=SIZE, width=SIZE, seed=1, cache="deepcache:2",
                 output_type="np").images
    assert np.isfinite(again).all()
    pipe.close()


@pytest.mark.parametrize("value, message", [
    ("deepcache:0", "between 1 and"), ("deepcache:x", "whole number"), ("fastcache", "unknown cache"),
    (3, "must be a string"), ("deepcache:101", "between 1 and"),
])
def test_bad_cache_values_are_refused_before_any_engine_runs(tiny_pipelines: dict, value, message: str) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    with pytest.raises(InputError, match=message):
        pipe("a cat", num_inference_steps=2, height=SIZE, width=SIZE, cache=value)
    assert pipe.components.loaded == ()


def test_a_transformer_pipeline_refuses_deepcache(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd3", "onnx")], device="cpu")
    with pytest.raises(InputError, match="needs a UNet that gives out 'deep_cache'"):
        pipe("a cat", num_inference_steps=2, height=SIZE, width=SIZE, cache="deepcache:2")
    out = pipe("a cat", num_inference_steps=1, height=SIZE, width=SIZE, cache="none", output_type="np").images
    assert out.shape == (1, SIZE, SIZE, 3)


def test_low_memory_releases_the_cut_with_its_unet(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "openvino" if ("tiny-sd15", "openvino") in tiny_pipelines
                                          else "onnx")], device="cpu", low_memory=True)
    latents = _latents(1)
    low = pipe("a cat", latents=latents, num_inference_steps=4, height=SIZE, width=SIZE, cache="deepcache:2",
               output_type="np").images
    assert pipe.components.loaded == ()
    pipe.close()
    fast = enginekit.load(pipe.path, device="cpu")
    high = fast("a cat", latents=latents, num_inference_steps=4, height=SIZE, width=SIZE, cache="deepcache:2",
                output_type="np").images
    assert np.array_equal(low, high)
