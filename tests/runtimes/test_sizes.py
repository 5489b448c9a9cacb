"""Every size diffusers' pipelines take, on every backend: odd latent sides against diffusers
on the same latents, image-to-image of a photo with no size, and the sizes an engine cannot
take refused in one line before any engine runs (library, CLI and the A1111 API)."""

from __future__ import annotations

import copy
import inspect
import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import enginekit  # noqa: E402
from enginekit.errors import InputError  # noqa: E402
from enginekit.runtimes.tasks.text_to_image import unpack_latents  # noqa: E402

from ..conftest import backend_params, installed_backends, make_photo, psnr, twin_cache  # noqa: E402

KINDS = backend_params("onnx")
PROMPT, NEGATIVE = "a lighthouse at dusk", "blurry"
#: Latent sides 9x8 and 11x13 (SD's factor 8): odd, so diffusers' UNet forwards the skip sizes.
ODD_SIZES = [(72, 64), (88, 104)]

_twin = twin_cache()


def _noise(channels: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, channels, height // 8, width // 8), dtype=np.float32)


def _diffusers(name: str, latents: np.ndarray, height: int, width: int, **call) -> np.ndarray:
    import diffusers

    pipe = _twin(name)
    if "scheduler" not in call:  # the UNet families: Euler on both sides (ours: "euler")
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    call.pop("scheduler", None)
    with torch.inference_mode():
        return pipe(PROMPT, num_inference_steps=3, height=height, width=width, latents=torch.from_numpy(latents),
                    output_type="np", **call).images


# ---------------------------------------------------------------------------- the exported UNet


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_the_patched_unet_is_diffusers_own_at_every_size(name: str) -> None:
    """carry_skip_sizes gives bit-identical outputs: at multiples (where diffusers upsamples by 2)
    and at odd sides (where it forwards the skip sizes), so the export traces one path for both."""
    from enginekit.export.diffusion.unet_sizes import carry_skip_sizes

    unet = _twin(name).unet
    patched = copy.deepcopy(unet)
    assert carry_skip_sizes(patched) and carry_skip_sizes(patched)  # idempotent
    assert patched.num_upsamplers == 0 and unet.num_upsamplers > 0
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    for hw in ((8, 8), (9, 8), (11, 13), (1, 3)):
        extra = {}
        if cfg.addition_embed_type == "text_time":
            width = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, width, generator=gen),
                                          "time_ids": torch.full((2, 6), 64.0)}
        args = (torch.randn(2, 4, *hw, generator=gen), torch.tensor([10.0, 500.0]),
                torch.randn(2, 77, cfg.cross_attention_dim, generator=gen))
        with torch.inference_mode():
            want = unet(*args, return_dict=False, **extra)[0]
            got = patched(*args, return_dict=False, **extra)[0]
        assert torch.equal(want, got), hw


def test_the_export_checks_the_unet_at_odd_sides(tiny_pipelines: dict) -> None:
    from enginekit.manifest import read_manifest

    report = read_manifest(tiny_pipelines[("tiny-sd15", "onnx")]).components["unet"].fidelity
    _, _, h, w = report["inputs"]["sample"]["shape"]
    assert h % 2 and w % 2  # tiny-sd15's UNet upsamples once: odd sides take the skip sizes


# ---------------------------------------------------------------------------- odd sizes vs diffusers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_odd_latent_sides_match_diffusers(tiny_pipelines: dict, name: str, kind: str) -> None:
    pipe = enginekit.load(tiny_pipelines[(name, kind)], device="cpu")
    for height, width in ODD_SIZES:
        latents = _noise(4, height, width, seed=height)
        got = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=7.5, height=height,
                   width=width, latents=latents, scheduler="euler", output_type="np").images
        ref = _diffusers(name, latents, height, width, negative_prompt=NEGATIVE, guidance_scale=7.5)
        assert got.shape == ref.shape == (1, height, width, 3)
        assert ref.std() > 0.05
        assert psnr(ref, got) >= 40.0, f"{name} on {kind} at {height}x{width}: {psnr(ref, got):.1f} dB"


@pytest.mark.parametrize("kind", KINDS)
def test_sd3_odd_patch_grid_matches_diffusers(tiny_pipelines: dict, kind: str) -> None:
    """80x48 is latent 10x6, a 5x3 grid of 2x2 patches: diffusers takes it (a multiple of 16)."""
    pipe = enginekit.load(tiny_pipelines[("tiny-sd3", kind)], device="cpu")
    latents = _noise(16, 80, 48, seed=1)
    call = dict(negative_prompt=NEGATIVE, guidance_scale=5.0, max_sequence_length=32)
    got = pipe(PROMPT, num_inference_steps=3, height=80, width=48, latents=latents, output_type="np", **call).images
    ref = _diffusers("tiny-sd3", latents, 80, 48, scheduler=None, **call)
    assert got.shape == ref.shape == (1, 80, 48, 3)
    assert psnr(ref, got) >= 40.0, f"{kind}: {psnr(ref, got):.1f} dB"


@pytest.mark.parametrize("kind", KINDS)
def test_flux_odd_token_grid_matches_diffusers(tiny_pipelines: dict, kind: str) -> None:
    """80x48 packs into a 5x3 grid of tokens (FLUX's sides are multiples of 16)."""
    pipe = enginekit.load(tiny_pipelines[("tiny-flux", kind)], device="cpu")
    packed = np.random.default_rng(2).standard_normal((1, 5 * 3, 64), dtype=np.float32)
    got = pipe(PROMPT, num_inference_steps=3, guidance_scale=3.5, height=80, width=48, latents=packed,
               max_sequence_length=64, output_type="np").images
    ref = _diffusers("tiny-flux", packed, 80, 48, scheduler=None, guidance_scale=3.5, max_sequence_length=64)
    assert got.shape == ref.shape == (1, 80, 48, 3)
    assert psnr(ref, got) >= 40.0, f"{kind}: {psnr(ref, got):.1f} dB"
    assert unpack_latents(packed, 5, 3).shape == (1, 16, 10, 6)


# ---------------------------------------------------------------------------- image-to-image


@pytest.mark.parametrize("kind", KINDS)
def test_a_photo_without_a_size_matches_diffusers_img2img(tiny_pipelines: dict, kind: str, monkeypatch) -> None:
    """A 100x75 photo runs at 96x72 (latent 12x9), resized as VaeImageProcessor does, and gives
    StableDiffusionImg2ImgPipeline's image on the same encoder draw and noise."""
    import diffusers
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img

    photo = make_photo((100, 75), seed=3)
    seed, steps, strength = 4, 6, 0.6
    eps = np.random.default_rng(seed).standard_normal((1, 4, 9, 12), dtype=np.float32)
    noise = _noise(4, 72, 96, seed=5)
    monkeypatch.setattr(img2img, "retrieve_latents", lambda output, generator=None, sample_mode="sample":
                        output.latent_dist.mean + output.latent_dist.std * torch.from_numpy(eps))
    monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise).reshape(shape))
    twin = img2img.StableDiffusionImg2ImgPipeline.from_pipe(_twin("tiny-sd15"))
    twin.scheduler = diffusers.EulerDiscreteScheduler.from_config(twin.scheduler.config)
    twin.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        ref = twin(PROMPT, image=photo, strength=strength, num_inference_steps=steps, negative_prompt=NEGATIVE,
                   output_type="np").images
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", kind)], device="cpu")
    out = pipe(PROMPT, image=photo, strength=strength, num_inference_steps=steps, negative_prompt=NEGATIVE,
               latents=noise, seed=seed, scheduler="euler", output_type="np")
    assert out.images.shape == ref.shape == (1, 72, 96, 3)
    assert psnr(ref, out.images) >= 40.0, f"{kind}: {psnr(ref, out.images):.1f} dB"


# ---------------------------------------------------------------------------- refused before any engine runs


@pytest.mark.parametrize(
    ("name", "size", "message"),
    [
        ("tiny-sd15", (70, 64), "height must be a multiple of 8, got 70 (try 64); this pipeline takes sides "
                                "that are multiples of 8 from 8 to 4096"),
        ("tiny-sd15", (64, 4), "width must be between 8 and 4096, got 4"),
        ("tiny-sd3", (72, 64), "height must be a multiple of 16, got 72 (try 64)"),
        ("tiny-sd3", (528, 64), "height must be between 16 and 512, got 528"),  # its position crop: 32 patches
        ("tiny-flux", (64, 72), "width must be a multiple of 16, got 72 (try 64)"),  # diffusers would round down
    ],
)
def test_a_size_diffusers_refuses_is_refused_in_one_line(tiny_pipelines: dict, name: str, size: tuple,
                                                         message: str) -> None:
    pipe = enginekit.load(tiny_pipelines[(name, "onnx")], device="cpu")
    with pytest.raises(InputError) as info:
        pipe(PROMPT, num_inference_steps=1, height=size[0], width=size[1])
    assert message in str(info.value) and "\n" not in str(info.value)
    assert pipe.components.loaded == ()  # nothing ran


def test_the_rule_matches_what_diffusers_refuses(tiny_pipelines: dict) -> None:
    """The sizes refused are the ones diffusers' own check_inputs refuses, per family."""
    from enginekit.runtimes.tasks.sizes import check_size, size_rule

    for name, sides in (("tiny-sd15", (56, 60, 64, 68, 72, 76)), ("tiny-sdxl", (60, 72)),
                        ("tiny-sd3", (40, 48, 56, 64, 72, 80))):
        rule = size_rule(enginekit.load(tiny_pipelines[(name, "onnx")], device="cpu").config)
        twin = _twin(name)
        params = inspect.signature(twin.check_inputs).parameters.values()
        required = {p.name: None for p in params if p.default is inspect.Parameter.empty}
        for side in sides:
            try:
                twin.check_inputs(**{**required, "prompt": PROMPT, "height": side, "width": 64})
                theirs = True
            except ValueError:
                theirs = False
            try:
                ours = check_size(rule, side, 64) == (side, 64)
            except InputError:
                ours = False
            assert ours == theirs, (name, side)


@pytest.mark.skipif("openvino" not in installed_backends(), reason="static shapes are an OpenVINO option")
def test_a_static_engine_takes_its_size_only(tiny_pipelines: dict, tmp_path: Path) -> None:
    from enginekit.app.build import build_engine

    onnx = tiny_pipelines[("tiny-sd15", "onnx")]
    build_engine(onnx, "openvino", tmp_path / "static", height=72, width=64, batch=1)
    pipe = enginekit.load(tmp_path / "static", device="cpu")
    with pytest.raises(InputError, match="compiled with static shapes for height 72 and width 64 and takes no "
                                         "other size, got 64x64"):
        pipe(PROMPT, num_inference_steps=1, height=64, width=64)
    assert pipe.components.loaded == ()
    latents = _noise(4, 72, 64)
    got = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, latents=latents, scheduler="euler",
               output_type="np").images  # no size: the engine's own
    ref = enginekit.load(onnx, device="cpu")(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, height=72,
                                              width=64, latents=latents, scheduler="euler", output_type="np").images
    assert got.shape == (1, 72, 64, 3) and psnr(ref, got) >= 40.0
    # An init image with no size is resized to the engine's size.
    out = pipe(PROMPT, image=make_photo((100, 75), seed=1), strength=0.5, num_inference_steps=4, seed=0,
               output_type="np")
    assert out.images.shape == (1, 72, 64, 3)


# ---------------------------------------------------------------------------- CLI and the A1111 API


@pytest.mark.parametrize("kind", KINDS)
def test_cli_generates_at_72x64(tiny_pipelines: dict, kind: str, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from enginekit.app.cli import cli

    result = CliRunner().invoke(cli, ["generate", str(tiny_pipelines[("tiny-sd15", kind)]), "a cat", "-o",
                                      str(tmp_path / "c.png"), "--height", "72", "--width", "64", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "c.png").size == (64, 72)


def test_cli_refuses_a_size_in_one_line(tiny_pipelines: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from enginekit.app.cli import cli

    result = CliRunner().invoke(cli, ["generate", str(tiny_pipelines[("tiny-sd3", "onnx")]), "a cat", "-o",
                                      str(tmp_path / "c.png"), "--height", "72", "--width", "64", "--steps", "2"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "height must be a multiple of 16, got 72 (try 64)" in result.output
    assert not (tmp_path / "c.png").exists()


def test_a1111_img2img_of_a_photo_without_a_size(tiny_pipelines: dict) -> None:
    pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")
    import base64

    from PIL import Image

    from enginekit.serve.app import create_app
    from enginekit.serve.settings import ServeSettings
    from enginekit.serve.testing import AppRunner

    buf = io.BytesIO()
    make_photo((100, 75), seed=6).save(buf, format="PNG")
    with AppRunner(create_app({"sd": tiny_pipelines[("tiny-sd15", "onnx")]}, ServeSettings(warmup=False))) as runner:
        r = runner.post("/sdapi/v1/img2img", json={"prompt": "a dog", "steps": 4, "denoising_strength": 0.5,
                                                   "seed": 3, "init_images": [base64.b64encode(buf.getvalue()).decode()]})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["width"], info["height"]) == (96, 72)
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (96, 72)


# ---------------------------------------------------------------------------- full size (slow)


@pytest.mark.slow
@pytest.mark.skipif("openvino" not in installed_backends(), reason="needs OpenVINO")
def test_full_size_sd15_at_512x680_on_openvino(tmp_path: Path) -> None:
    """Full-size SD 1.5 (seeded weights) at 512x680: latent 64x85, an odd side at every one of
    its three upsamplers' levels but the first; against diffusers on the same latents.
    Export, compile and two steps take several minutes and ~12 GB on 2 cores."""
    import diffusers

    from enginekit.api import compile_artifact
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline
    from enginekit.export.diffusion.sources import resolve_pipeline

    src = resolve_pipeline("sd15", random_weights=True, seed=0)
    export_pipeline(src, tmp_path / "onnx", PipelineExportOptions(image_check=False))
    compile_artifact(tmp_path / "onnx", "openvino", tmp_path / "ov")
    height, width, steps = 512, 680, 2
    latents = _noise(4, height, width, seed=7)
    dpipe = src.pipeline
    dpipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(dpipe.scheduler.config)
    dpipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        ref = dpipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=height, width=width,
                    latents=torch.from_numpy(latents), output_type="np").images
    pipe = enginekit.load(tmp_path / "ov", device="cpu")
    got = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=height, width=width,
               latents=latents, scheduler="euler", output_type="np").images
    assert got.shape == ref.shape == (1, height, width, 3)
    assert psnr(ref, got) >= 40.0, f"{psnr(ref, got):.1f} dB"
