"""SD3 (MMDiT transformer, CLIP-L + CLIP-G + optional T5, 16-channel VAE, flow matching):
images against diffusers' StableDiffusion3Pipeline on the same latents, with and without T5,
``max_sequence_length``, a folder source, static shapes, and what SD3 refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import enginekit  # noqa: E402
from enginekit.errors import InputError  # noqa: E402

from ..conftest import backend_params, diffusers_twin, installed_backends, psnr  # noqa: E402

SIZE = 64
PROMPTS = ["a lighthouse at dusk", "a red bicycle leaning on a wall"]
NEGATIVES = ["blurry", "low quality"]


def _latents(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16, SIZE // 8, SIZE // 8), dtype=np.float32)


_twin: dict[str, object] = {}


def _pipe():
    if "pipe" not in _twin:
        pipe = diffusers_twin("tiny-sd3")
        pipe.set_progress_bar_config(disable=True)
        _twin["pipe"] = pipe
    return _twin["pipe"]


def _reference(pipe, latents: np.ndarray, negative, steps: int = 4, **kwargs) -> np.ndarray:
    with torch.inference_mode():
        return pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=5.0,
                    height=SIZE, width=SIZE, latents=torch.from_numpy(latents), output_type="np", **kwargs).images


@pytest.mark.parametrize("kind", backend_params("onnx"))
def test_images_match_diffusers_on_the_same_latents(tiny_pipelines: dict, kind: str) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd3", kind)], device="cpu")
    assert pipe.config.layout == "sd3" and pipe.config.is_flow
    latents = _latents(len(PROMPTS))
    got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=5.0, height=SIZE,
               width=SIZE, latents=latents, output_type="np").images
    ref = _reference(_pipe(), latents, NEGATIVES)
    assert got.shape == ref.shape == (2, SIZE, SIZE, 3)
    assert ref.std() > 0.02
    assert psnr(ref, got) >= 40.0, f"{kind}: {psnr(ref, got):.1f} dB"


def test_manifest_records_what_the_runtime_needs(tiny_pipelines: dict) -> None:
    from enginekit.manifest import read_manifest

    manifest = read_manifest(tiny_pipelines[("tiny-sd3", "onnx")])
    assert manifest.family == "sd3"
    assert set(manifest.components) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer",
                                        "vae_decoder", "vae_encoder"}
    section = manifest.task_config
    assert section["denoiser"] == "transformer" and section["latent_channels"] == 16
    assert section["vae_shift_factor"] == pytest.approx(0.0609)
    assert section["tokenizers"]["tokenizer_3"]["kind"] == "t5"
    assert section["tokenizers"]["tokenizer_3"]["max_length"] == section["max_sequence_length"] == 256
    assert manifest.fidelity["image"]["psnr_db"] >= 40.0
    names = [s.name for s in manifest.components["transformer"].inputs]
    assert names == ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]


def test_max_sequence_length_matches_diffusers_and_is_checked(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd3", "onnx")], device="cpu")
    latents = _latents(len(PROMPTS), seed=2)
    got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=5.0, height=SIZE,
               width=SIZE, latents=latents, output_type="np", max_sequence_length=24).images
    ref = _reference(_pipe(), latents, NEGATIVES, steps=3, max_sequence_length=24)
    assert psnr(ref, got) >= 40.0
    with pytest.raises(InputError, match="max_sequence_length"):
        pipe("a cat", num_inference_steps=1, max_sequence_length=513)
    with pytest.raises(InputError, match="flow-euler"):
        pipe("a cat", num_inference_steps=1, scheduler="euler")
    with pytest.warns(UserWarning, match="max_sequence_length of 8 tokens"):
        pipe("a lighthouse on a cliff at dusk over a stormy sea", num_inference_steps=1, max_sequence_length=8)


def test_unet_pipelines_refuse_sd3_options(tiny_pipelines: dict) -> None:
    pipe = enginekit.load(tiny_pipelines[("tiny-sd15", "onnx")], device="cpu")
    with pytest.raises(InputError, match="SD3"):
        pipe("a cat", num_inference_steps=1, max_sequence_length=64)
    with pytest.raises(InputError, match="flow-euler"):
        pipe("a cat", num_inference_steps=1, scheduler="flow-euler")


@pytest.fixture(scope="module")
def no_t5_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tiny-sd3 without T5 written by save_pretrained, and its export from that folder."""
    from enginekit.export.diffusion.sd import export_pipeline
    from enginekit.export.diffusion.sources import resolve_pipeline

    root = tmp_path_factory.mktemp("sd3")
    pipe = resolve_pipeline("tiny-sd3").pipeline
    pipe.text_encoder_3 = None
    pipe.tokenizer_3 = None
    folder = root / "tiny-sd3-no-t5"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    out = root / "no-t5-onnx"
    export_pipeline(str(folder), out)
    return folder, out


def test_a_folder_without_t5_exports_and_matches_diffusers(no_t5_folder: tuple[Path, Path]) -> None:
    import diffusers

    folder, art = no_t5_folder
    pipe = enginekit.load(art, device="cpu")
    assert pipe.manifest.family == "sd3" and "text_encoder_3" not in pipe.manifest.components
    assert pipe.manifest.provenance["family_from"] == "pipeline class"
    ref_pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True,
                                                                 text_encoder_3=None, tokenizer_3=None)
    ref_pipe.set_progress_bar_config(disable=True)
    latents = _latents(len(PROMPTS), seed=4)
    got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=5.0, height=SIZE,
               width=SIZE, latents=latents, output_type="np").images
    ref = _reference(ref_pipe, latents, NEGATIVES, steps=3)
    assert psnr(ref, got) >= 40.0


def test_export_no_t5_never_builds_t5_and_diffusers_is_rebuilt_without_it(tmp_path: Path) -> None:
    """``export --no-t5``: no T5 graph, the provenance says so, and the diffusers pipeline
    bench/optimize rebuild from it has no T5 either (the images agree on the same latents)."""
    from click.testing import CliRunner

    from enginekit.app.cli import cli
    from enginekit.bench.pipeline import _diffusers_pipeline
    from enginekit.export.diffusion import sources

    built: list[str] = []
    real = sources._tokenizer_for
    sources._tokenizer_for = lambda folder, name: built.append(name) or real(folder, name)
    try:
        result = CliRunner().invoke(cli, ["export", "tiny-sd3", "--no-t5", "--no-image-check", "-o", str(tmp_path / "a")])
    finally:
        sources._tokenizer_for = real
    assert result.exit_code == 0, result.output
    assert "tokenizer_3" not in built and "tokenizer" in built
    pipe = enginekit.load(tmp_path / "a", device="cpu")
    assert "text_encoder_3" not in pipe.manifest.components and pipe.manifest.provenance["without_t5"] is True
    ref_pipe = _diffusers_pipeline(pipe.manifest)
    assert ref_pipe.text_encoder_3 is None and ref_pipe.tokenizer_3 is None
    ref_pipe.set_progress_bar_config(disable=True)
    latents = _latents(len(PROMPTS), seed=5)
    got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=5.0, height=SIZE,
               width=SIZE, latents=latents, output_type="np").images
    assert psnr(_reference(ref_pipe, latents, NEGATIVES, steps=3), got) >= 40.0


def test_no_t5_on_a_folder_that_has_t5_leaves_it_unloaded(tmp_path: Path) -> None:
    from enginekit.export.diffusion.sources import resolve_pipeline

    resolve_pipeline("tiny-sd3").pipeline.save_pretrained(str(tmp_path / "p"), safe_serialization=True)
    src = resolve_pipeline(str(tmp_path / "p"), without_t5=True)
    assert src.pipeline.text_encoder_3 is None and src.pipeline.text_encoder is not None
    assert src.provenance["without_t5"] is True


def test_no_t5_from_the_hub_fetches_no_t5_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub snapshot is asked to leave T5 out, and a folder without its files loads."""
    import shutil

    import huggingface_hub

    from enginekit.export.diffusion.sources import resolve_pipeline

    folder = tmp_path / "snap"
    resolve_pipeline("tiny-sd3").pipeline.save_pretrained(str(folder), safe_serialization=True)
    asked: dict[str, object] = {}

    def snapshot(repo_id, **kwargs):
        asked.update(kwargs)
        for name in kwargs.get("ignore_patterns") or ():
            shutil.rmtree(folder / name.split("/")[0], ignore_errors=True)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    src = resolve_pipeline("org/sd3-model", without_t5=True)
    assert asked["ignore_patterns"] == ["text_encoder_3/*", "tokenizer_3/*"]
    assert not (folder / "text_encoder_3").exists() and src.pipeline.text_encoder_3 is None
    assert not any(k.startswith("text_encoder_3/") for k in src.provenance["weights_sha256"])


@pytest.mark.parametrize(("model", "why"), [("tiny-flux", "FLUX conditions on T5"), ("tiny-sd15", "no T5 encoder"),
                                            ("default", "SD3/SD3.5 pipelines only")])
def test_no_t5_is_refused_where_there_is_no_optional_t5(tmp_path: Path, model: str, why: str) -> None:
    from click.testing import CliRunner

    from enginekit.app.cli import cli

    result = CliRunner().invoke(cli, ["export", model, "--no-t5", "-o", str(tmp_path / "x")])
    assert result.exit_code != 0 and why in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif("openvino" not in installed_backends(), reason="needs OpenVINO")
def test_static_shapes_on_openvino(tiny_pipelines: dict, tmp_path: Path) -> None:
    from enginekit.api import compile_artifact
    from enginekit.engine import CompileOptions
    from enginekit.manifest import read_manifest
    from enginekit.runtimes.tasks.text_to_image import TextToImage

    src = tiny_pipelines[("tiny-sd3", "onnx")]
    options = TextToImage.compile_options(read_manifest(src), "openvino", height=SIZE, width=SIZE, batch=2)
    assert options["dims"]["transformer"]["sequence"] == 77 + 256
    assert options["dims"]["text_encoder_3"]["sequence"] == 256
    compile_artifact(src, "openvino", tmp_path / "static", CompileOptions(extra=options))
    pipe = enginekit.load(tmp_path / "static", device="cpu")
    latents = _latents(2, seed=8)
    got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=2, guidance_scale=5.0, height=SIZE,
               width=SIZE, latents=latents, output_type="np").images
    ref = _reference(_pipe(), latents, NEGATIVES, steps=2)
    assert psnr(ref, got) >= 40.0
    with pytest.raises(InputError, match="compiled for"):
        pipe(PROMPTS, num_inference_steps=1, height=SIZE, width=SIZE, max_sequence_length=32)


def test_image_to_image_runs_part_of_the_schedule(tiny_pipelines: dict) -> None:
    from PIL import Image

    pipe = enginekit.load(tiny_pipelines[("tiny-sd3", "onnx")], device="cpu")
    init = Image.fromarray((np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3))).astype(np.uint8))
    out = pipe("a cat", image=init, strength=0.5, num_inference_steps=10, seed=1, output_type="np")
    # diffusers' SD3 img2img: int(max(10 - 10 * 0.5, 0)) = 5 steps skipped.
    assert len(out.timesteps) == 5 and out.images.shape == (1, SIZE, SIZE, 3)


def test_image_to_image_matches_diffusers(tiny_pipelines: dict, monkeypatch) -> None:
    """StableDiffusion3Img2ImgPipeline on the same encoder draw and noise (diffusers draws with
    torch, ours with numpy: the test hands diffusers ours)."""
    import diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img as img2img
    from PIL import Image

    seed, steps, strength = 3, 5, 0.7
    init = Image.fromarray((np.random.default_rng(2).uniform(0, 255, (SIZE, SIZE, 3))).astype(np.uint8))
    noise = _latents(1, seed=6)
    eps = np.random.default_rng(seed).standard_normal((1, 16, SIZE // 8, SIZE // 8), dtype=np.float32)
    monkeypatch.setattr(img2img, "retrieve_latents", lambda output, generator=None, sample_mode="sample":
                        output.latent_dist.mean + output.latent_dist.std * torch.from_numpy(eps))
    monkeypatch.setattr(img2img, "randn_tensor", lambda shape, **kw: torch.from_numpy(noise).reshape(shape))
    twin = img2img.StableDiffusion3Img2ImgPipeline(**_pipe().components)
    twin.set_progress_bar_config(disable=True)
    call = dict(negative_prompt="blurry", strength=strength, num_inference_steps=steps, guidance_scale=5.0,
                max_sequence_length=32)
    with torch.inference_mode():
        ref = twin("a lighthouse at dusk", image=init, height=SIZE, width=SIZE, output_type="np", **call).images
    pipe = enginekit.load(tiny_pipelines[("tiny-sd3", "onnx")], device="cpu")
    out = pipe("a lighthouse at dusk", image=init, latents=noise, seed=seed, output_type="np", **call)
    assert len(out.timesteps) == 4  # int(max(5 - 3.5, 0)) = 1 of 5 steps skipped
    assert psnr(ref, out.images) >= 40.0, f"{psnr(ref, out.images):.1f} dB"


@pytest.mark.parametrize("family", ["tiny-sd3", "tiny-flux"])
def test_bench_times_transformer_pipelines_beside_diffusers(tiny_pipelines: dict, tmp_path: Path,
                                                           family: str) -> None:
    """The transformer families bench like the UNet ones: each component, a step (SD3 with both
    CFG passes in one call, FLUX one distilled pass) and a whole image, diffusers beside them,
    the image on the same latents matching diffusers'."""
    import json

    from click.testing import CliRunner

    from enginekit.app.cli import cli

    store = tmp_path / "r.jsonl"
    result = CliRunner().invoke(cli, ["bench", "run", str(tiny_pipelines[(family, "onnx")]), "--runs", "1",
                                      "--steps", "2", "--baseline", "torch", "--store", str(store)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in store.read_text().splitlines()]
    ours = {r["part"]: r for r in records if not r.get("baseline")}
    theirs = {r["part"]: r for r in records if r.get("baseline")}
    assert {"component:transformer", "component:vae_decoder", "step", "image"} <= set(ours) == set(theirs)
    rows = 1 if family == "tiny-flux" else 2  # FLUX runs no unconditional pass
    assert ours["component:transformer"]["batch"] == rows
    assert ours["image"]["fidelity"]["image_max_abs"] < 1e-3  # same latents, same scheduler as diffusers
    assert all(r["speedup"] > 0 for r in ours.values())
