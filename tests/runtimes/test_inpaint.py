"""Inpainting against diffusers' own pipelines, on every backend: the 9-channel inpainting UNet
(SD 1.5 and SDXL) and masked image-to-image on an ordinary UNet, at strength 1 and below, with
``padding_mask_crop``, on the same latents and the same VAE draws; and the inputs a user gets
wrong, refused in one line before any engine runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import enginekit  # noqa: E402
from enginekit.errors import InputError  # noqa: E402

from ..conftest import backend_params, installed_backends, make_mask, make_photo, psnr, twin_cache  # noqa: E402

KINDS = backend_params("onnx")
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
_twin = twin_cache()


def _draws(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """The standard normals numpy's generator gives a call seeded ``seed``, in order."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s, dtype=np.float32) for s in shapes]


def _reference(monkeypatch, pipe: object, module: object, eps: list[np.ndarray], noise: np.ndarray | None,
               **call) -> np.ndarray:
    """diffusers' inpainting pipeline with its VAE draws (in order) and its noise made ours."""
    queue = list(eps)

    def retrieve(output, generator=None, sample_mode="sample"):
        dist = output.latent_dist
        return dist.mean + dist.std * torch.from_numpy(queue.pop(0)) if queue else dist.mean

    monkeypatch.setattr(module, "retrieve_latents", retrieve)
    if noise is not None:
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise).reshape(shape))
    import diffusers

    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.inference_mode():
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, **call).images


def _module(name: str) -> object:
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as sd
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as xl

    return xl if "sdxl" in name else sd


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_an_inpainting_unet_matches_diffusers(inpainting: dict, kind: str, strength: float, monkeypatch) -> None:
    """A 100x75 photo (run at 96x72) and a mask of another size (resized as diffusers does):
    the same image as StableDiffusionInpaintPipeline on the same noise and VAE draws."""
    name, seed = "tiny-sd15-inpainting", 11
    photo, mask = make_photo((100, 75), seed=1), make_mask((50, 38), (10, 8, 34, 26))
    grid = (1, 4, 9, 12)
    noise = np.random.default_rng(3).standard_normal(grid, dtype=np.float32)
    pipe = enginekit.load(inpainting[(name, kind)], device="cpu")
    out = pipe(PROMPT, negative_prompt=NEGATIVE, image=photo, mask_image=mask, strength=strength, latents=noise,
               num_inference_steps=4, seed=seed, scheduler="euler", output_type="np")
    # Ours draws the init image's posterior (below strength 1), then the masked image's.
    eps = _draws(seed, *([grid] * (1 if strength == 1.0 else 2)))
    module = _module(name)
    twin = _twin(name)
    # diffusers takes given latents as pure noise whatever the strength: below 1 it draws them instead.
    given = {"latents": torch.from_numpy(noise)} if strength == 1.0 else {}
    ref = _reference(monkeypatch, twin, module, eps, None if given else noise, image=photo, mask_image=mask,
                     strength=strength, height=72, width=96, output_type="np", **given)
    assert out.images.shape == ref.shape == (1, 72, 96, 3)
    assert psnr(ref, out.images) >= 40.0, f"{kind}: {psnr(ref, out.images):.1f} dB"


@pytest.mark.parametrize("kind", KINDS)
def test_an_ordinary_unet_keeps_the_unmasked_region_as_diffusers_does(tiny_pipelines: dict, kind: str,
                                                                       monkeypatch) -> None:
    """Masked image-to-image on the 4-channel tiny SD 1.5 (diffusers' legacy inpainting): the
    same image, and outside the mask the picture that went in."""
    import diffusers

    photo, mask = make_photo((64, 64), seed=2), make_mask((64, 64), (16, 16, 44, 40))
    grid, seed, strength = (1, 4, 8, 8), 5, 0.7
    noise = np.random.default_rng(4).standard_normal(grid, dtype=np.float32)
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", kind)], device="cpu")
    out = pipe(PROMPT, negative_prompt=NEGATIVE, image=photo, mask_image=mask, strength=strength, latents=noise,
               num_inference_steps=4, seed=seed, scheduler="euler", output_type="np")
    twin = diffusers.StableDiffusionInpaintPipeline.from_pipe(_twin("tiny-sd15"))
    twin.set_progress_bar_config(disable=True)
    ref = _reference(monkeypatch, twin, _module("tiny-sd15"), _draws(seed, grid), noise, image=photo,
                     mask_image=mask, strength=strength, height=64, width=64, output_type="np")
    assert psnr(ref, out.images) >= 40.0, f"{kind}: {psnr(ref, out.images):.1f} dB"
    # Outside the mask the last step's latents are the init image's own (encoded with the same draw).
    from enginekit.runtimes.images import vae_preprocess

    latents = pipe(PROMPT, negative_prompt=NEGATIVE, image=photo, mask_image=mask, strength=strength, latents=noise,
                   num_inference_steps=4, seed=seed, scheduler="euler", output_type="latent").images
    init = pipe.encode_image(vae_preprocess(photo, 64, 64), np.random.default_rng(seed))
    kept = (np.asarray(mask, dtype=np.float32)[::8, ::8] / 255 < 0.5)
    assert kept.any() and (~kept).any()
    np.testing.assert_allclose(latents[0][:, kept], init[0][:, kept], atol=1e-5)
    assert not np.allclose(latents[0][:, ~kept], init[0][:, ~kept], atol=1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_mask_crop_matches_diffusers(inpainting: dict, kind: str, monkeypatch) -> None:
    """Only the mask's padded box is generated (at the size asked for) and pasted back: the
    original image's size comes out, and diffusers' image."""
    name, seed = "tiny-sd15-inpainting", 7
    photo, mask = make_photo((120, 90), seed=4), make_mask((120, 90), (70, 20, 100, 50))
    pipe = enginekit.load(inpainting[(name, kind)], device="cpu")
    noise = np.random.default_rng(8).standard_normal((1, 4, 8, 8), dtype=np.float32)
    out = pipe(PROMPT, negative_prompt=NEGATIVE, image=photo, mask_image=mask, padding_mask_crop=6, height=64,
               width=64, latents=noise, num_inference_steps=4, seed=seed, scheduler="euler")
    ref = _reference(monkeypatch, _twin(name), _module(name), _draws(seed, (1, 4, 8, 8)), None, image=photo,
                     mask_image=mask, padding_mask_crop=6, height=64, width=64, latents=torch.from_numpy(noise))
    assert out.images[0].size == ref[0].size == (120, 90)
    got, want = (np.asarray(x, dtype=np.float32) / 255 for x in (out.images[0], ref[0]))
    assert psnr(want, got) >= 40.0, f"{kind}: {psnr(want, got):.1f} dB"
    far = np.asarray(mask) == 0
    far[:, 60:] = False  # left of the crop box: the original photo, untouched
    assert np.array_equal(np.asarray(out.images[0])[far], np.asarray(photo)[far])


@pytest.mark.parametrize("kind", KINDS)
def test_an_sdxl_inpainting_unet_matches_diffusers(inpainting: dict, kind: str, monkeypatch) -> None:
    name, seed = "tiny-sdxl-inpainting", 2
    photo, mask = make_photo((64, 64), seed=6), make_mask((64, 64), (8, 8, 40, 56))
    noise = np.random.default_rng(9).standard_normal((1, 4, 8, 8), dtype=np.float32)
    pipe = enginekit.load(inpainting[(name, kind)], device="cpu")
    out = pipe(PROMPT, negative_prompt=NEGATIVE, image=photo, mask_image=mask, latents=noise, num_inference_steps=4,
               seed=seed, scheduler="euler", output_type="np")
    ref = _reference(monkeypatch, _twin(name), _module(name), _draws(seed, (1, 4, 8, 8)), None, image=photo,
                     mask_image=mask, strength=1.0, height=64, width=64, latents=torch.from_numpy(noise),
                     output_type="np")
    assert psnr(ref, out.images) >= 40.0, f"{kind}: {psnr(ref, out.images):.1f} dB"


def test_an_inpainting_model_without_an_image_is_text_to_image(inpainting: dict) -> None:
    """No image: the whole picture repainted (a white mask over a blank image), as diffusers'
    inpainting pipeline gives it; the call is deterministic for a seed."""
    from enginekit.export.diffusion.reference import WholeImageInpaint

    name = "tiny-sd15-inpainting"
    pipe = enginekit.load(inpainting[(name, "onnx")], device="cpu")
    noise = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    out = pipe(PROMPT, latents=noise, num_inference_steps=3, scheduler="euler", output_type="np").images
    import diffusers

    twin = WholeImageInpaint(_twin(name))
    twin.scheduler = diffusers.EulerDiscreteScheduler.from_config(twin.scheduler.config)
    with torch.inference_mode():
        ref = twin(PROMPT, num_inference_steps=3, latents=torch.from_numpy(noise), output_type="np").images
    assert psnr(ref, out) >= 40.0
    again = pipe(PROMPT, latents=noise, num_inference_steps=3, scheduler="euler", output_type="np").images
    assert np.array_equal(out, again)


def test_bad_masks_are_refused_in_one_line(inpainting: dict, tmp_path: Path) -> None:
    pipe = enginekit.load(inpainting[("tiny-sd15-inpainting", "onnx")], device="cpu")
    photo = make_photo((64, 64), seed=0)
    not_an_image = tmp_path / "mask.png"
    not_an_image.write_bytes(b"this is not a PNG")
    cases = [
        (dict(mask_image=make_mask((64, 64), (0, 0, 9, 9))), "mask_image needs an image"),
        (dict(image=photo, mask_image=not_an_image), "mask_image:"),
        (dict(image=photo, mask_image=12), "mask_image:"),
        (dict(image=photo, padding_mask_crop=4), "padding_mask_crop crops around the mask"),
        (dict(image=photo, mask_image=make_mask((64, 64), (0, 0, 0, 0)).point(lambda v: 0), padding_mask_crop=4),
         "mask_image is all black"),
        (dict(image=photo, mask_image=make_mask((64, 64), (0, 0, 9, 9)), padding_mask_crop=-1), "padding_mask_crop"),
        (dict(image=photo, mask_image=make_mask((64, 64), (0, 0, 9, 9)), strength=0.0), "strength must be above 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError) as info:
            pipe(PROMPT, num_inference_steps=2, **kwargs)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert pipe.components.loaded == ()  # nothing ran
    # ...and the next call works.
    out = pipe(PROMPT, image=photo, mask_image=make_mask((64, 64), (8, 8, 30, 30)), num_inference_steps=2, seed=1)
    assert out.images[0].size == (64, 64)


def test_a_reduced_precision_engine_keeps_inpainting(inpainting: dict, tmp_path: Path) -> None:
    """OpenVINO fp16 weights (bf16 compute where the CPU has it): the same inpainting within the image budget."""
    from enginekit.app.build import build_engine

    if "openvino" not in installed_backends():
        pytest.skip("openvino is not installed")
    build_engine(inpainting[("tiny-sd15-inpainting", "onnx")], "openvino", tmp_path / "fp16", precision="fp16")
    photo, mask = make_photo((64, 64), seed=9), make_mask((64, 64), (10, 10, 40, 40))
    call = dict(image=photo, mask_image=mask, num_inference_steps=3, seed=2, output_type="np")
    ref = enginekit.load(inpainting[("tiny-sd15-inpainting", "onnx")], device="cpu")(PROMPT, **call).images
    got = enginekit.load(tmp_path / "fp16", device="cpu")(PROMPT, **call).images
    assert psnr(ref, got) >= 30.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_masked_image_to_image_on_sd3_and_flux_matches_diffusers(tiny_pipelines: dict, name: str, kind: str,
                                                                 monkeypatch) -> None:
    """The legacy blend on the flow-matching families (16 channels; FLUX's latents packed), against
    StableDiffusion3InpaintPipeline and FluxInpaintPipeline on the same VAE draw and noise. SD3's
    is compared on the final latents: diffusers' SD3 inpainting decodes without the VAE's shift
    factor (its text-to-image and image-to-image add it), so its images are off by that shift."""
    import diffusers
    import diffusers.pipelines.flux.pipeline_flux_inpaint as flux_module
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint as sd3_module

    from enginekit.runtimes.tasks.text_to_image import pack_latents

    flux = name == "tiny-flux"
    photo, mask = make_photo((64, 64), seed=12), make_mask((64, 64), (12, 20, 50, 44))
    grid, seed, strength = (1, 16, 8, 8), 6, 0.7
    noise = np.random.default_rng(7).standard_normal(grid, dtype=np.float32)
    pipe = enginekit.load(tiny_pipelines[(name, kind)], device="cpu")
    call = dict(num_inference_steps=4, guidance_scale=3.5 if flux else 5.0, max_sequence_length=64)
    output = "np" if flux else "latent"
    out = pipe(PROMPT, image=photo, mask_image=mask, strength=strength, latents=pack_latents(noise) if flux else noise,
               seed=seed, output_type=output, **call).images
    cls = diffusers.FluxInpaintPipeline if flux else diffusers.StableDiffusion3InpaintPipeline
    twin = cls.from_pipe(_twin(name))
    twin.set_progress_bar_config(disable=True)
    module = flux_module if flux else sd3_module
    (eps,) = _draws(seed, grid)
    monkeypatch.setattr(module, "retrieve_latents", lambda output, generator=None, sample_mode="sample":
                        output.latent_dist.mean + output.latent_dist.std * torch.from_numpy(eps))
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise).reshape(shape))
    with torch.inference_mode():
        ref = twin(PROMPT, image=photo, mask_image=mask, strength=strength, height=64, width=64, output_type=output,
                   **call).images
    if flux:
        assert out.shape == ref.shape == (1, 64, 64, 3)
        assert psnr(ref, out) >= 40.0, f"{name} {kind}: {psnr(ref, out):.1f} dB"
    else:
        ref = ref.numpy()
        assert out.shape == ref.shape == grid
        assert np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max(), f"{kind}: {np.abs(out - ref).max()}"
