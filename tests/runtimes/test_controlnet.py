"""ControlNet against diffusers' own ControlNet pipelines on every backend: a ControlNet built
from the tiny UNet with its zero convolutions perturbed (so the control image changes the
image), one and two ControlNets with their own scales and guidance windows, SD 1.5 and SDXL,
on the same latents; a call without a control image is the plain UNet's; bad control input and
a ControlNet for another family refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import enginekit  # noqa: E402
from enginekit.errors import InputError, SourceError  # noqa: E402

from ..conftest import backend_params, installed_backends, make_photo, psnr, twin_cache  # noqa: E402

KINDS = backend_params("onnx")
PROMPT, NEGATIVE = "a house by a lake", "blurry"
_twin = twin_cache()


def make_controlnet(unet: object, folder: Path, seed: int) -> Path:
    """diffusers' ControlNet of ``unet`` (its weights), the zero convolutions made non-zero."""
    import diffusers

    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.3)
    cn.save_pretrained(folder, safe_serialization=True)
    return folder


def edges(size: tuple[int, int], seed: int) -> object:
    from PIL import Image, ImageFilter

    return make_photo(size, seed=seed).convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB")


@pytest.fixture(scope="module")
def controlled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """tiny SD 1.5 with one ControlNet and with two (tiny SDXL with one on demand); exported and compiled."""
    root = tmp_path_factory.mktemp("controlnet")
    nets = {"sd15": [make_controlnet(_twin("tiny-sd15").unet, root / f"cn15-{i}", i) for i in (1, 2)],
            "sdxl": [make_controlnet(_twin("tiny-sdxl").unet, root / "cnxl", 3)]}
    out: dict = {"nets": nets}
    # SDXL's ControlNet pipeline is built only when its (slow-marked) test asks for it.
    out["build_xl"] = lambda: _build(out, root, ("xl", "tiny-sdxl", nets["sdxl"]))
    for job in (("one", "tiny-sd15", nets["sd15"][:1]), ("two", "tiny-sd15", nets["sd15"])):
        _build(out, root, job)
    return out


def _build(out: dict, root: Path, job: tuple) -> None:
    from enginekit.api import compile_artifact
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

    for key, name, cns in (job,):
        if (key, "onnx") in out:
            continue
        # The export's own whole-image check (against diffusers' ControlNet pipeline) once; the tests check all three.
        export_pipeline(name, root / key, PipelineExportOptions(controlnets=tuple(map(str, cns)),
                                                                image_check=key == "one"))
        out[(key, "onnx")] = root / key
        for backend in installed_backends():
            compile_artifact(root / key, backend, root / f"{key}-{backend}")
            out[(key, backend)] = root / f"{key}-{backend}"


def _reference(name: str, nets: list[Path], latents: np.ndarray, **call) -> np.ndarray:
    import diffusers

    base = _twin(name)
    cns = [diffusers.ControlNetModel.from_pretrained(str(p)) for p in nets]
    cls = diffusers.StableDiffusionXLControlNetPipeline if "sdxl" in name else diffusers.StableDiffusionControlNetPipeline
    pipe = cls.from_pipe(base, controlnet=cns[0] if len(cns) == 1 else diffusers.MultiControlNetModel(cns))
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, latents=torch.from_numpy(latents),
                    output_type="np", **call).images


@pytest.mark.parametrize("kind", KINDS)
def test_one_controlnet_matches_diffusers(controlled: dict, kind: str) -> None:
    """The control image's own size (72x64 latents 9x8, odd) sets the output's; scale 0.7,
    switched off for the last quarter of the steps."""
    control = edges((72, 64), seed=1)
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 9), dtype=np.float32)
    pipe = enginekit.load(controlled[("one", kind)], device="cpu")
    call = dict(controlnet_conditioning_scale=0.7, control_guidance_end=0.75)
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, latents=noise, scheduler="euler",
               output_type="np", control_image=control, **call).images
    ref = _reference("tiny-sd15", controlled["nets"]["sd15"][:1], noise, image=control, **call)
    assert out.shape == ref.shape == (1, 64, 72, 3)
    assert psnr(ref, out) >= 40.0, f"{kind}: {psnr(ref, out):.1f} dB"
    plain = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, latents=noise, scheduler="euler",
                 height=64, width=72, output_type="np").images
    assert psnr(out, plain) < 35.0  # the control image steers the image
    base = _twin("tiny-sd15")
    import diffusers

    base.scheduler = diffusers.EulerDiscreteScheduler.from_config(base.scheduler.config)
    with torch.inference_mode():
        uncontrolled = base(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, height=64, width=72,
                            latents=torch.from_numpy(noise), output_type="np").images
    assert psnr(uncontrolled, plain) >= 40.0  # without a control image: the plain pipeline's image


@pytest.mark.parametrize("kind", KINDS)
def test_two_controlnets_with_their_own_scales_and_windows(controlled: dict, kind: str) -> None:
    images = [edges((64, 64), seed=2), make_photo((80, 80), seed=3)]  # the second resized to the output
    noise = np.random.default_rng(1).standard_normal((2, 4, 8, 8), dtype=np.float32)
    call = dict(controlnet_conditioning_scale=[0.8, 0.4], control_guidance_start=[0.0, 0.25],
                control_guidance_end=[1.0, 0.75])
    pipe = enginekit.load(controlled[("two", kind)], device="cpu")
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, latents=noise, scheduler="euler",
               output_type="np", control_image=images, num_images_per_prompt=2, height=64, width=64, **call).images
    ref = _reference("tiny-sd15", controlled["nets"]["sd15"], noise, image=images, num_images_per_prompt=2,
                     height=64, width=64, **call)
    assert out.shape == ref.shape == (2, 64, 64, 3)
    assert psnr(ref, out) >= 40.0, f"{kind}: {psnr(ref, out):.1f} dB"


@pytest.mark.slow  # SDXL's ControlNet pipeline: another export and two compiles (run with -m slow)
@pytest.mark.parametrize("kind", KINDS)
def test_an_sdxl_controlnet_matches_diffusers(controlled: dict, kind: str) -> None:
    controlled["build_xl"]()
    control = edges((64, 64), seed=4)
    noise = np.random.default_rng(2).standard_normal((1, 4, 8, 8), dtype=np.float32)
    pipe = enginekit.load(controlled[("xl", kind)], device="cpu")
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, latents=noise, scheduler="euler",
               output_type="np", control_image=control, controlnet_conditioning_scale=0.5).images
    ref = _reference("tiny-sdxl", controlled["nets"]["sdxl"], noise, image=control, controlnet_conditioning_scale=0.5)
    assert psnr(ref, out) >= 40.0, f"{kind}: {psnr(ref, out):.1f} dB"


def test_bad_control_input_is_refused_in_one_line(controlled: dict, tiny_pipelines: dict, tmp_path: Path) -> None:
    pipe = enginekit.load(controlled[("two", "onnx")], device="cpu")
    one = edges((64, 64), seed=5)
    cases = [
        (dict(control_image=one), "control_image: 1 image(s) for 2 ControlNet(s)"),
        (dict(control_image=[one, b"not an image"]), "control_image:"),
        (dict(control_image=[one, one], controlnet_conditioning_scale=[1.0]), "controlnet_conditioning_scale has 1"),
        (dict(control_image=[one, one], controlnet_conditioning_scale=11.0), "controlnet_conditioning_scale must be"),
        (dict(control_image=[one, one], control_guidance_start=0.6, control_guidance_end=0.4),
         "control_guidance_start (0.6) must be below"),
        (dict(controlnet_conditioning_scale=0.5), "controlnet_conditioning_scale steers a ControlNet"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError) as info:
            pipe(PROMPT, num_inference_steps=2, **kwargs)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    plain = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    with pytest.raises(InputError, match="this pipeline has no ControlNet"):
        plain(PROMPT, num_inference_steps=2, control_image=one)
    assert pipe(PROMPT, num_inference_steps=2, control_image=[one, one], seed=1).images[0].size == (64, 64)


def test_a_controlnet_for_another_family_is_refused(controlled: dict, tmp_path: Path) -> None:
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

    xl_net = controlled["nets"]["sdxl"][0]
    with pytest.raises(SourceError) as info:
        export_pipeline("tiny-sd15", tmp_path / "x", PipelineExportOptions(controlnets=(str(xl_net),)))
    assert "a ControlNet for" in str(info.value) and "not for this sd15 pipeline" in str(info.value)
    assert not (tmp_path / "x").exists()
    with pytest.raises(SourceError, match="no such ControlNet"):
        export_pipeline("tiny-sd15", tmp_path / "y", PipelineExportOptions(controlnets=(str(tmp_path / "nope"),)))


def test_every_surface_gives_the_python_call(controlled: dict, tmp_path: Path) -> None:
    """``generate --control-image``, ``/v1/generate``'s ``control_image`` and A1111's ControlNet
    units give the library's image; a static-shape OpenVINO compile takes the ControlNet too."""
    import base64
    import io

    from click.testing import CliRunner
    from PIL import Image

    from enginekit.app.cli import cli
    from enginekit.serve import ServeSettings, create_app
    from enginekit.serve.testing import AppRunner

    art = controlled[("one", "onnx")]
    pipe = enginekit.load(art, device="cpu")
    control = edges((64, 64), seed=6)
    control.save(tmp_path / "edges.png")
    want = np.asarray(pipe(PROMPT, num_inference_steps=3, seed=5, control_image=control,
                           controlnet_conditioning_scale=0.6).images[0])
    out = tmp_path / "out.png"
    result = CliRunner().invoke(cli, ["generate", str(art), PROMPT, "--control-image", str(tmp_path / "edges.png"),
                                      "--controlnet-scale", "0.6", "--steps", "3", "--seed", "5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), want)
    # --control-map: the map made from a photo first, as canny makes it
    photo = Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    from enginekit.runtimes.control_maps import canny

    canny_map = canny(photo, 50, 150)
    canny_want = np.asarray(pipe(PROMPT, num_inference_steps=3, seed=5, control_image=canny_map,
                                 controlnet_conditioning_scale=0.6).images[0])
    result = CliRunner().invoke(cli, ["generate", str(art), PROMPT, "--control-image", str(tmp_path / "photo.png"),
                                      "--control-map", "canny:50,150", "--controlnet-scale", "0.6", "--steps", "3",
                                      "--seed", "5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), canny_want)
    assert not np.array_equal(canny_want, want)
    result = CliRunner().invoke(cli, ["generate", str(art), PROMPT, "--control-map", "canny", "-o", str(out)])
    assert result.exit_code == 2 and "give it with --control-image" in result.output
    b64 = base64.b64encode((tmp_path / "edges.png").read_bytes()).decode()
    with AppRunner(create_app({"cn": art}, ServeSettings(warmup=False))) as server:
        r = server.post("/v1/generate", json={"prompt": PROMPT, "steps": 3, "seed": 5, "control_image": b64,
                                              "controlnet_conditioning_scale": 0.6})
        assert r.status_code == 200, r.text
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")), want)
        unit = {"enabled": True, "image": b64, "module": "none", "model": "whatever", "weight": 0.6}
        r = server.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3, "seed": 5, "sampler_name": "Euler",
                                                   "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        ref = np.asarray(pipe(PROMPT, num_inference_steps=3, seed=5, scheduler="euler", control_image=control,
                              controlnet_conditioning_scale=0.6).images[0])
        assert np.array_equal(np.asarray(got), ref)
        r = server.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "alwayson_scripts": {
            "controlnet": {"args": [{**unit, "module": "openpose"}]}}})
        assert r.status_code == 422 and "module" in r.json()["error"], r.text
        # A photo and the canny map made from it: each surface gives the library's canny(photo) image.
        photo_b64 = base64.b64encode((tmp_path / "photo.png").read_bytes()).decode()
        r = server.post("/v1/generate", json={"prompt": PROMPT, "steps": 3, "seed": 5, "control_image": photo_b64,
                                              "control_map": "canny:50,150", "controlnet_conditioning_scale": 0.6})
        assert r.status_code == 200, r.text
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")), canny_want)
        r = server.post("/sdapi/v1/txt2img", json={
            "prompt": PROMPT, "steps": 3, "seed": 5, "sampler_name": "Euler", "alwayson_scripts": {"controlnet": {
                "args": [{**unit, "image": photo_b64, "module": "canny", "threshold_a": 50, "threshold_b": 150}]}}})
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")
        ref = np.asarray(pipe(PROMPT, num_inference_steps=3, seed=5, scheduler="euler", control_image=canny_map,
                              controlnet_conditioning_scale=0.6).images[0])
        assert np.array_equal(np.asarray(got), ref)
        r = server.post("/v1/generate", json={"prompt": PROMPT, "steps": 2, "control_image": photo_b64,
                                              "control_map": "depth"})
        assert r.status_code == 422 and "not a map enginekit makes" in r.json()["error"], r.text
        r = server.post("/v1/generate", json={"prompt": PROMPT, "steps": 2, "control_image": [b64, b64]})
        assert r.status_code == 422 and "2 image(s) for 1 ControlNet" in r.json()["error"], r.text
        assert server.post("/v1/generate", json={"prompt": PROMPT, "steps": 2, "seed": 1}).status_code == 200
    if "openvino" in installed_backends():
        from enginekit.app.build import build_engine

        static = tmp_path / "static"
        build_engine(art, "openvino", static, height=64, width=64, batch=1)
        fixed = enginekit.load(static, device="cpu")
        got = np.asarray(fixed(PROMPT, num_inference_steps=3, seed=5, control_image=control,
                               controlnet_conditioning_scale=0.6).images[0], dtype=np.float32) / 255
        assert psnr(want.astype(np.float32) / 255, got) >= 40.0


def test_a_controlnet_steers_an_inpainting_model_as_diffusers_does(controlled: dict, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The base model's ControlNet on the 9-channel inpainting UNet (it sees the latents alone, the
    UNet also the mask and the masked image): diffusers' StableDiffusionControlNetInpaintPipeline on
    the same noise and VAE draws, on every backend; the export's own whole-image check passes too."""
    import diffusers
    import diffusers.pipelines.controlnet.pipeline_controlnet_inpaint as module

    from enginekit.api import compile_artifact
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

    from ..conftest import make_mask

    net = controlled["nets"]["sd15"][0]
    manifest = export_pipeline("tiny-sd15-inpainting", tmp_path / "onnx",
                               PipelineExportOptions(controlnets=(str(net),)))
    assert manifest.fidelity["image"]["psnr_db"] >= 40.0  # the export's check against diffusers, without an image
    kinds = {"onnx": tmp_path / "onnx"}
    for backend in installed_backends():
        kinds[backend] = compile_artifact(tmp_path / "onnx", backend, tmp_path / backend) and tmp_path / backend
    photo, mask = make_photo((64, 64), seed=7), make_mask((40, 40), (8, 6, 30, 28))
    control, seed = edges((64, 64), 8), 13
    noise = np.random.default_rng(5).standard_normal((1, 4, 8, 8), dtype=np.float32)
    call = dict(controlnet_conditioning_scale=0.7, control_guidance_end=0.75)
    pipe = diffusers.StableDiffusionControlNetInpaintPipeline.from_pipe(
        _twin("tiny-sd15-inpainting"), controlnet=diffusers.ControlNetModel.from_pretrained(str(net)))
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    eps = np.random.default_rng(seed).standard_normal((1, 4, 8, 8), dtype=np.float32)  # ours: the masked image's draw
    monkeypatch.setattr(module, "retrieve_latents", lambda output, generator=None, sample_mode="sample":
                        output.latent_dist.mean + output.latent_dist.std * torch.from_numpy(eps))
    with torch.inference_mode():
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, image=photo, mask_image=mask, control_image=control,
                   latents=torch.from_numpy(noise), strength=1.0, height=64, width=64, num_inference_steps=4,
                   output_type="np", **call).images
    for kind, path in kinds.items():
        ours = enginekit.load(path, device="cpu")
        out = ours(PROMPT, negative_prompt=NEGATIVE, image=photo, mask_image=mask, control_image=control, strength=1.0,
                   latents=noise, num_inference_steps=4, seed=seed, scheduler="euler", output_type="np", **call).images
        assert psnr(ref, out) >= 40.0, f"{kind}: {psnr(ref, out):.1f} dB"
        plain = ours(PROMPT, negative_prompt=NEGATIVE, image=photo, mask_image=mask, strength=1.0, latents=noise,
                     num_inference_steps=4, seed=seed, scheduler="euler", output_type="np").images
        assert psnr(out, plain) < 35.0  # the control image steers the repainted region
        ours.close()
