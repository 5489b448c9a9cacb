"""FLUX (CLIP-L pooled + T5, packed 2x2 latents with rotary ids, guidance-distilled, flow
matching with a resolution-dependent shift): images against diffusers' FluxPipeline on the
same packed latents, ``max_sequence_length``, static shapes, and what FLUX refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import enginekit  # noqa: E402
from enginekit.errors import InputError  # noqa: E402
from enginekit.runtimes.tasks.text_to_image import pack_latents, unpack_latents  # noqa: E402

from ..conftest import backend_params, diffusers_twin, installed_backends, psnr  # noqa: E402

SIZE = 64
PROMPTS = ["a lighthouse at dusk", "a red bicycle leaning on a wall"]
_twin: dict[str, object] = {}


def _pipe():
    if "pipe" not in _twin:
        pipe = diffusers_twin("tiny-flux")
        pipe.set_progress_bar_config(disable=True)
        _twin["pipe"] = pipe
    return _twin["pipe"]


def _latents(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """Packed, as diffusers' FluxPipeline takes latents=: (N, (H/16)(W/16), 64)."""
    return pack_latents(np.random.default_rng(seed).standard_normal((n, 16, size // 8, size // 8), dtype=np.float32))


def _reference(latents: np.ndarray, steps: int = 4, size: int = SIZE, **kwargs) -> np.ndarray:
    with torch.inference_mode():
        return _pipe()(PROMPTS, num_inference_steps=steps, guidance_scale=3.5, height=size, width=size,
                       latents=torch.from_numpy(latents), output_type="np", **kwargs).images


def test_packing_matches_diffusers() -> None:
    from diffusers import FluxPipeline

    x = np.random.default_rng(1).standard_normal((2, 16, 6, 10), dtype=np.float32)
    ours = pack_latents(x)
    theirs = FluxPipeline._pack_latents(torch.from_numpy(x), 2, 16, 6, 10).numpy()
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(unpack_latents(ours, 3, 5), x)


@pytest.mark.parametrize("kind", backend_params("onnx"))
def test_images_match_diffusers_on_the_same_latents(tiny_pipelines: dict, kind: str) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-flux", kind)], device="cpu")
    assert pipe.config.layout == "flux" and pipe.config.max_sequence_length == 512  # dev: guidance embeds
    latents = _latents(len(PROMPTS))
    got = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.5, height=SIZE, width=SIZE, latents=latents,
               output_type="np").images
    ref = _reference(latents)
    assert got.shape == ref.shape == (2, SIZE, SIZE, 3) and ref.std() > 0.02
    assert psnr(ref, got) >= 40.0, f"{kind}: {psnr(ref, got):.1f} dB"


def test_other_size_and_sequence_length_match(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-flux", "onnx")], device="cpu")
    latents = pack_latents(np.random.default_rng(3).standard_normal((2, 16, 12, 12), dtype=np.float32))
    got = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.5, height=96, width=96, latents=latents,
               output_type="np", max_sequence_length=64).images
    ref = _reference(latents, steps=3, size=96, max_sequence_length=64)
    assert psnr(ref, got) >= 40.0


def test_flux_refuses_what_it_cannot_do(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-flux", "onnx")], device="cpu")
    with pytest.raises(InputError, match="multiple of 16"):
        pipe("a cat", num_inference_steps=1, height=72, width=64)
    with pytest.raises(InputError, match="negative prompt needs true_cfg_scale"):
        pipe("a cat", negative_prompt="blurry", num_inference_steps=1)
    with pytest.raises(InputError, match="latents must have shape"):
        pipe("a cat", num_inference_steps=1, latents=np.zeros((1, 16, 8, 8), np.float32))
    with pytest.raises(InputError, match="flow-euler"):
        pipe("a cat", num_inference_steps=1, scheduler="ddim")
    out = pipe("a cat", num_inference_steps=2, seed=5, output_type="latent")
    assert out.images.shape == (1, 16, 64)  # packed, as diffusers returns them


@pytest.mark.skipif("openvino" not in installed_backends(), reason="needs OpenVINO")
def test_static_shapes_on_openvino(tiny_pipelines: dict, tmp_path: Path) -> None:
    from enginekit.api import compile_artifact
    from enginekit.engine import CompileOptions
    from enginekit.manifest import read_manifest
    from enginekit.runtimes.tasks.text_to_image import TextToImage

    src = tiny_pipelines[("tiny-flux", "onnx")]
    options = TextToImage.compile_options(read_manifest(src), "openvino", height=SIZE, width=SIZE, batch=2)
    assert options["dims"]["transformer"] == {"batch": 2, "sequence": 512, "image_sequence": 16}
    compile_artifact(src, "openvino", tmp_path / "static", CompileOptions(extra=options))
    pipe = enginekit.load(tmp_path / "static", device="cpu")
    latents = _latents(2, seed=8)
    got = pipe(PROMPTS, num_inference_steps=2, guidance_scale=3.5, height=SIZE, width=SIZE, latents=latents,
               output_type="np").images
    assert psnr(_reference(latents, steps=2), got) >= 40.0
    with pytest.raises(InputError, match="compiled for max_sequence_length 512"):
        pipe(PROMPTS, num_inference_steps=1, height=SIZE, width=SIZE, max_sequence_length=32)


def test_true_cfg_matches_diffusers(tiny_pipelines: dict) -> None:
    """A negative prompt with true_cfg_scale > 1: a second pass on it, as diffusers' FluxPipeline."""
    pipe = enginekit.load(tiny_pipelines[("tiny-flux", "onnx")], device="cpu")
    latents = _latents(len(PROMPTS), seed=4)
    call = dict(negative_prompt="blurry, dark", true_cfg_scale=4.0, max_sequence_length=64)
    got = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.5, height=SIZE, width=SIZE, latents=latents,
               output_type="np", **call).images
    ref = _reference(latents, steps=3, **call)
    plain = _reference(latents, steps=3, max_sequence_length=64)
    assert psnr(ref, plain) < 40.0, "the negative pass changed nothing: the test would prove nothing"
    assert psnr(ref, got) >= 40.0, f"{psnr(ref, got):.1f} dB"
    with pytest.raises(InputError, match="FLUX pipelines only"):
        enginekit.load(tiny_pipelines[("tiny-sd3", "onnx")], device="cpu")("a cat", true_cfg_scale=2.0)


def test_image_to_image_matches_diffusers(tiny_pipelines: dict, monkeypatch) -> None:
    """FluxImg2ImgPipeline on the same encoder draw and the same noise: diffusers samples both
    with torch, ours with numpy, so the test hands diffusers the draws ours makes."""
    import diffusers.pipelines.flux.pipeline_flux_img2img as img2img
    from PIL import Image

    seed, steps, strength = 7, 6, 0.6
    rng = np.random.default_rng(11)
    init = Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    noise = _latents(1, seed=9)  # packed, as our latents= takes it
    eps = np.random.default_rng(seed).standard_normal((1, 16, SIZE // 8, SIZE // 8), dtype=np.float32)

    def retrieve(output, generator=None, sample_mode="sample"):
        dist = output.latent_dist
        return dist.mean + dist.std * torch.from_numpy(eps)

    monkeypatch.setattr(img2img, "retrieve_latents", retrieve)
    monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **kw: torch.from_numpy(
        unpack_latents(noise, SIZE // 16, SIZE // 16)).reshape(shape))
    twin = img2img.FluxImg2ImgPipeline(**_pipe().components)
    twin.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        ref = twin("a lighthouse at dusk", image=init, strength=strength, num_inference_steps=steps,
                   guidance_scale=3.5, height=SIZE, width=SIZE, max_sequence_length=64, output_type="np").images
    pipe = enginekit.load(tiny_pipelines[("tiny-flux", "onnx")], device="cpu")
    out = pipe("a lighthouse at dusk", image=init, strength=strength, num_inference_steps=steps, guidance_scale=3.5,
               max_sequence_length=64, latents=noise, seed=seed, output_type="np")
    assert len(out.timesteps) == 4  # diffusers skips int(max(6 - 6 * 0.6, 0)) = 2 of 6 steps
    assert out.images.shape == ref.shape == (1, SIZE, SIZE, 3)
    assert psnr(ref, out.images) >= 40.0, f"{psnr(ref, out.images):.1f} dB"
