"""TextToImage: images against diffusers' own pipeline on the same latents, every
scheduler, image-to-image, lazily loaded components, and bad input."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

import enginekit  # noqa: E402
from enginekit.bench.pipeline import DIFFUSERS_SCHEDULERS  # noqa: E402
from enginekit.errors import ImageError, InputError, ManifestError  # noqa: E402
from enginekit.runtimes.tasks.text_to_image import GenerationCancelled, TextToImage  # noqa: E402

from ..conftest import backend_params, diffusers_twin, installed_backends, make_photo, psnr  # noqa: E402

SIZE = 64
PROMPTS = ["a lighthouse at dusk", "a red bicycle leaning on a wall"]
NEGATIVES = ["blurry", "low quality"]
_SCHEDULER_CLASSES = DIFFUSERS_SCHEDULERS  # our port -> diffusers' class, as the bench pairs them


def _latents(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


def _diffusers_images(name: str, scheduler: str, latents: np.ndarray, negative: list[str] | None,
                      steps: int = 4, guidance: float = 7.5) -> np.ndarray:
    import diffusers
    import torch

    pipe, original = _twins(name)
    cls, kwargs = _SCHEDULER_CLASSES[scheduler]
    # From the pipeline's own config each time: a config saved by another scheduler
    # class carries its options (use_karras_sigmas) into the next.
    pipe.scheduler = getattr(diffusers, cls).from_config(original, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        return pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                    height=SIZE, width=SIZE, latents=torch.from_numpy(latents), output_type="np").images


_cache: dict[str, object] = {}


def _twins(name: str):
    if name not in _cache:
        pipe = diffusers_twin(name)
        _cache[name] = (pipe, dict(pipe.scheduler.config))
    return _cache[name]


@pytest.mark.parametrize("kind", backend_params("onnx"))
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_images_match_diffusers_on_the_same_latents(tiny_pipelines: dict, name: str, kind: str) -> None:
    pipe = enginekit.load(tiny_pipelines[(name, kind)], device="cpu")
    latents = _latents(len(PROMPTS))
    for scheduler in ("euler", "dpm++2m-karras"):
        got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=7.5, height=SIZE,
                   width=SIZE, latents=latents, scheduler=scheduler, output_type="np").images
        ref = _diffusers_images(name, scheduler, latents, NEGATIVES)
        assert got.shape == ref.shape == (2, SIZE, SIZE, 3)
        assert ref.std() > 0.05  # the image is not flat: PSNR means something
        assert psnr(ref, got) >= 40.0, f"{name} on {kind} with {scheduler}: {psnr(ref, got):.1f} dB"


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m", "euler-a", "lcm"])
def test_every_scheduler_matches_diffusers(tiny_pipelines: dict, scheduler: str) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    latents = _latents(len(PROMPTS), seed=3)
    if scheduler in ("euler-a", "lcm"):  # stochastic: diffusers draws torch noise, so compare one step only
        got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=1, height=SIZE, width=SIZE,
                   latents=latents, scheduler=scheduler, output_type="np").images
        ref = _diffusers_images("tiny-sd15", scheduler, latents, NEGATIVES, steps=1)
    else:
        got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=5, height=SIZE, width=SIZE,
                   latents=latents, scheduler=scheduler, output_type="np").images
        ref = _diffusers_images("tiny-sd15", scheduler, latents, NEGATIVES, steps=5)
    assert psnr(ref, got) >= 40.0


def test_sdxl_without_negative_prompt_uses_zeros_like_diffusers(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sdxl", "onnx")], device="cpu")
    assert pipe.config.force_zeros_for_empty_prompt
    latents = _latents(len(PROMPTS), seed=5)
    got = pipe(PROMPTS, num_inference_steps=3, guidance_scale=7.5, height=SIZE, width=SIZE, latents=latents,
               scheduler="euler",
               output_type="np").images
    ref = _diffusers_images("tiny-sdxl", "euler", latents, None, steps=3)
    assert psnr(ref, got) >= 40.0


def test_guidance_off_runs_one_pass_and_matches(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    latents = _latents(len(PROMPTS), seed=6)
    got = pipe(PROMPTS, num_inference_steps=3, guidance_scale=1.0, height=SIZE, width=SIZE, latents=latents,
               scheduler="ddim", output_type="np").images
    ref = _diffusers_images("tiny-sd15", "ddim", latents, None, steps=3, guidance=1.0)
    assert psnr(ref, got) >= 40.0


def test_seeds_reproduce_and_differ(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    a = pipe("a cat", num_inference_steps=2, seed=42, output_type="np")
    b = pipe("a cat", num_inference_steps=2, seed=42, output_type="np")
    c = pipe("a cat", num_inference_steps=2, seed=43, output_type="np")
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert a.seed == 42 and len(a.timesteps) == 2
    assert a.images.shape == (1, pipe.config.default_size, pipe.config.default_size, 3)


def test_pil_output_several_images_per_prompt_and_latent_output(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sdxl", "onnx")], device="cpu")
    out = pipe(PROMPTS, num_inference_steps=2, num_images_per_prompt=2, seed=1, height=SIZE, width=SIZE + 16)
    assert len(out.images) == 4 and out.images[0].size == (SIZE + 16, SIZE)
    lat = pipe("x", num_inference_steps=1, seed=1, output_type="latent", height=SIZE, width=SIZE).images
    assert lat.shape == (1, 4, SIZE // 8, SIZE // 8)


def test_components_load_when_first_used(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    assert isinstance(pipe, TextToImage) and pipe.components.loaded == ()
    pipe("a cat", num_inference_steps=1, seed=0, output_type="np")
    assert set(pipe.components.loaded) == {"text_encoder", "unet", "vae_decoder"}  # never the VAE encoder
    pipe("a cat", image=make_photo((SIZE, SIZE), seed=1), strength=0.5, num_inference_steps=2, seed=0)
    assert "vae_encoder" in pipe.components.loaded
    pipe.close()
    assert pipe.components.loaded == ()


def test_image_to_image(tiny_pipelines: dict, tmp_path: Path) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    photo = make_photo((70, 52), seed=2)  # rounded down to 64 x 48
    steps_seen: list[int] = []
    out = pipe("a cat", image=photo, strength=0.5, num_inference_steps=10, seed=0, output_type="np",
               callback=lambda i, t, lat: steps_seen.append(i))
    assert out.images.shape == (1, 48, 64, 3)
    assert len(out.timesteps) == 5 and steps_seen == [0, 1, 2, 3, 4]
    path = tmp_path / "init.png"
    photo.save(path)
    again = pipe("a cat", image=str(path), strength=0.5, num_inference_steps=10, seed=0, output_type="np")
    np.testing.assert_array_equal(out.images, again.images)
    with pytest.raises(InputError, match="leaves no step"):
        pipe("a cat", image=photo, strength=0.05, num_inference_steps=10)
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(ImageError):
        pipe("a cat", image=str(bad))


def test_callback_and_event_cancel(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    with pytest.raises(GenerationCancelled, match="after step 2"):
        pipe("a cat", num_inference_steps=5, callback=lambda i, t, lat: i < 1)
    event = threading.Event()
    event.set()
    with pytest.raises(GenerationCancelled, match="before step 1"):
        pipe("a cat", num_inference_steps=5, cancel=event)


def test_long_prompt_is_truncated_with_a_warning(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    prompt = " ".join(["lighthouse"] * 90)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(prompt, num_inference_steps=1, seed=0, output_type="latent")
    messages = [str(w.message) for w in caught]
    assert any("15 tokens were dropped" in m for m in messages), messages


def test_empty_prompt_is_unconditional_and_valid(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    assert pipe("", num_inference_steps=1, seed=0, output_type="np").images.shape[0] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 500}, "height must be a multiple of 8, got 500 \\(try 496\\)"),
        ({"width": 4}, "width must be between 8 and 4096"),
        ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 1000, got 0"),
        ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer"),
        ({"scheduler": "pndm"}, "unknown scheduler 'pndm'; choose one of: euler"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be between"),
        ({"num_images_per_prompt": 100}, "num_images_per_prompt must be between 1 and 16"),
        ({"latents": np.zeros((1, 4, 3, 3), np.float32)}, "latents must have shape \\(1, 4, 8, 8\\)"),
        ({"negative_prompt": ["a", "b", "c"]}, "negative_prompt has 3 entries for 1 prompts"),
        ({"output_type": "jpg"}, "output_type must be"),
        ({"seed": -1}, "seed must be between 0"),
        ({"strength": 1.5, "image": "x"}, None),
    ],
)
def test_bad_input_is_one_clear_error(tiny_pipelines: dict, kwargs: dict, message: str | None) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    if message is None:  # a missing init image file
        with pytest.raises(ImageError):
            pipe("a cat", height=SIZE, width=SIZE, **kwargs)
        return
    with pytest.raises(InputError, match=message):
        pipe("a cat", height=kwargs.pop("height", SIZE), **kwargs)


@pytest.mark.parametrize("prompt", [None, 3, [], ["ok", 4]])
def test_prompt_must_be_text(tiny_pipelines: dict, prompt: object) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    with pytest.raises(InputError, match="prompt must be a string or a non-empty list of strings"):
        pipe(prompt)


def test_a_missing_component_is_named(tiny_pipelines: dict, tmp_path: Path) -> None:
    import json
    import shutil

    art = tmp_path / "broken"
    shutil.copytree(tiny_pipelines[("tiny-sd15", "onnx")], art)
    data = json.loads((art / "manifest.json").read_text())
    del data["components"]["unet"]
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="needs component 'unet', which the artifact lacks"):
        enginekit.load(art)


def test_a_tokenizer_that_does_not_fit_the_encoder_is_refused(tiny_pipelines: dict, tmp_path: Path) -> None:
    import json
    import shutil

    art = tmp_path / "mismatch"
    shutil.copytree(tiny_pipelines[("tiny-sd15", "onnx")], art)
    data = json.loads((art / "manifest.json").read_text())
    data["text-to-image"]["text_encoder_vocab_sizes"]["text_encoder"] = 1000
    (art / "manifest.json").write_text(json.dumps(data))
    pipe = enginekit.load(art, device="cpu")
    with pytest.raises(ManifestError, match="tokenizer 'tokenizer' has 49408 tokens but text encoder"):
        pipe("a cat", num_inference_steps=1)


def test_static_shape_openvino_pipeline(tiny_pipelines: dict, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from enginekit.app.build import build_engine

    out = build_engine(tiny_pipelines[("tiny-sd15", "onnx")], "openvino", tmp_path / "static", height=SIZE,
                       width=SIZE, batch=1, precision="fp16")
    assert out.components["unet"].inputs[0].shape == (2, 4, SIZE // 8, SIZE // 8)
    assert out.components["vae_decoder"].inputs[0].shape == (1, 4, SIZE // 8, SIZE // 8)
    assert out.components["text_encoder"].inputs[0].shape == ("batch", 77)
    pipe = enginekit.load(tmp_path / "static", device="cpu")
    latents = _latents(1)
    got = pipe(PROMPTS[:1], negative_prompt=NEGATIVES[:1], num_inference_steps=3, latents=latents,
               scheduler="euler", output_type="np").images
    ref = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")(
        PROMPTS[:1], negative_prompt=NEGATIVES[:1], num_inference_steps=3, latents=latents, scheduler="euler",
        output_type="np").images
    assert psnr(ref, got) >= 30.0  # fp16 weights, the device's precision
    with pytest.raises(InputError, match="static shapes .* are not an option of the onnxruntime backend; openvino and tensorrt take them"):
        build_engine(tiny_pipelines[("tiny-sd15", "onnx")], "onnxruntime", tmp_path / "x", height=SIZE)


def test_sdxl_fp16_keeps_the_vae_fp32(tiny_pipelines: dict, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from enginekit.app.build import build_engine

    src = tiny_pipelines[("tiny-sdxl", "onnx")]
    if enginekit.api.read_manifest(src).task_config.get("vae_precision") != "fp32":
        pytest.skip("this tiny SDXL VAE does not ask for fp32")
    out = build_engine(src, "openvino", tmp_path / "xl16", precision="fp16")
    assert out.components["unet"].precision == "fp16"
    assert out.components["vae_decoder"].precision == "fp32"


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_export_records_the_whole_image_parity(tiny_pipelines: dict, name: str) -> None:
    manifest = enginekit.api.read_manifest(tiny_pipelines[(name, "onnx")])
    image = manifest.fidelity["image"]
    assert image["reference"] == "diffusers" and image["psnr_db"] >= image["budget_psnr_db"] == 40.0
    assert {"prompt", "steps", "scheduler", "height", "width", "latents"} <= set(image)
    compiled = enginekit.api.read_manifest(tiny_pipelines[(name, installed_backends()[0])])
    assert compiled.fidelity["image"] == image  # carried to the engine compiled from it


def test_an_image_under_budget_fails_the_export(tiny_pipelines: dict) -> None:
    from enginekit.errors import FidelityError
    from enginekit.export.diffusion.sd import PipelineExportOptions, _check_image

    root = tiny_pipelines[("tiny-sd15", "onnx")]
    manifest = enginekit.api.read_manifest(root)
    with pytest.raises(FidelityError, match=r"dB from diffusers' on the same latents \(budget 1000"):
        _check_image(_twins("tiny-sd15")[0], root, manifest, PipelineExportOptions(min_psnr=1000.0), lambda m: None)
