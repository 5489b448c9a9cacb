"""TensorRT on a CUDA GPU, against PyTorch: the tiny ViTs (fp32, fp16, int8 through the gate) and
every component of the tiny SD 1.5 pipeline, then its whole image against ONNX Runtime's.

Marked ``gpu`` and ``tensorrt``: skipped with the reason on a machine without them, failing instead
under ``ENGINEKIT_REQUIRE_GPU=1`` (``bench/gpu_check.sh`` runs them so). These have not run on a
GPU yet; the tolerances are TensorRT's usual ones (fp32 kernels may use TF32-free tactics only,
fp16 within a few thousandths), to be tightened once they have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ..conftest import make_photo, psnr, twin_cache

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt]
_twin = twin_cache()


def _torch_logits(src_dir: Path, pixels: np.ndarray) -> np.ndarray:
    import torch

    from enginekit.export.sources import resolve_source

    src = resolve_source(str(src_dir))
    with torch.no_grad():
        out = src.model(torch.from_numpy(pixels))
    return (out if src.library == "timm" else out.logits).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("precision, atol, min_cosine", [("fp32", 1e-3, 0.99999), ("fp16", 2e-2, 0.999)])
@pytest.mark.parametrize("source", ["timm", "hf"])
def test_tiny_vits_match_pytorch(source: str, precision: str, atol: float, min_cosine: float,
                                 exported: dict[str, Path], tiny_timm_dir: Path, tiny_hf_dir: Path,
                                 tmp_path: Path) -> None:
    from enginekit.api import compile_artifact, load_runner
    from enginekit.engine import CompileOptions

    extra = {"precision": precision} if precision != "fp32" else {}
    manifest = compile_artifact(exported[source], "tensorrt", tmp_path / "trt", CompileOptions(device="cuda",
                                                                                               extra=extra))
    assert manifest.target["precision"] == precision and manifest.target["compute_capability"]
    pixels = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    reference = _torch_logits(tiny_timm_dir if source == "timm" else tiny_hf_dir, pixels)
    runner, _ = load_runner(tmp_path / "trt", device="cuda")
    with runner:
        for batch in (1, 4):  # two shapes inside the one dynamic profile
            got = runner.run({"pixel_values": pixels[:batch]})["logits"]
            assert np.abs(got - reference[:batch]).max() <= atol
            assert _cosine(got, reference[:batch]) >= min_cosine


def test_a_static_profile_runs_as_a_cuda_graph(exported: dict[str, Path], tmp_path: Path) -> None:
    from enginekit.api import compile_artifact, load_runner
    from enginekit.engine import CompileOptions

    compile_artifact(exported["timm"], "tensorrt", tmp_path / "trt",
                     CompileOptions(device="cuda", extra={"shapes": ["pixel_values:2x3x32x32"]}))
    runner, _ = load_runner(tmp_path / "trt", device="cuda")
    pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with runner:
        first = runner.run({"pixel_values": pixels})["logits"]
        assert runner.cuda_graphs  # every profile static: replayed from the second call
        again = runner.run({"pixel_values": pixels})["logits"]  # the replayed graph
        other = runner.run({"pixel_values": pixels[::-1].copy()})["logits"]
    assert np.array_equal(first, again) and np.allclose(other, first[::-1], atol=1e-4)


def test_int8_qdq_goes_through_the_gate_and_builds(exported: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("modelopt.onnx.quantization", reason="int8 Q/DQ needs nvidia-modelopt[onnx]")
    import enginekit
    from enginekit.app.build import build_engine

    manifest = build_engine(exported["timm"], "tensorrt", tmp_path / "int8", device="cuda", int8=True,
                            calibration="synthetic")
    assert manifest.component().quantization["method"] == "int8-modelopt"
    photos = [make_photo((96, 80), seed) for seed in range(8)]
    reference = enginekit.load(exported["timm"], device="cpu").predict(photos)
    got = enginekit.load(tmp_path / "int8", device="cuda").predict(photos)
    assert np.mean([a.label == b.label for a, b in zip(got, reference)]) >= 0.75


@pytest.fixture(scope="module")
def sd15_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from enginekit.export.diffusion.sd import export_pipeline

    out = tmp_path_factory.mktemp("sd15") / "onnx"
    export_pipeline("tiny-sd15", out)
    return out


@pytest.fixture(scope="module")
def sd15_plans(sd15_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from enginekit.app.build import build_engine

    out = tmp_path_factory.mktemp("sd15-trt") / "trt"
    build_engine(sd15_onnx, "tensorrt", out, device="cuda")
    return out


def test_every_sd15_component_matches_diffusers(sd15_plans: Path) -> None:
    import torch

    from enginekit.api import load_runner

    pipe = _twin("tiny-sd15")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (2, 77)).astype(np.int64)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        hidden = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
        noise = pipe.unet(torch.from_numpy(latents), torch.tensor([500, 500]),
                          torch.from_numpy(hidden)).sample.numpy()
        decoded = pipe.vae.decode(torch.from_numpy(latents[:1])).sample.numpy()
        moments = pipe.vae.encode(torch.from_numpy(image)).latent_dist.mean.numpy()
    checks = {"text_encoder": ({"input_ids": ids}, "last_hidden_state", hidden), "unet": (
        {"sample": latents, "timestep": np.array([500, 500], np.float32), "encoder_hidden_states": hidden},
        "out_sample", noise),
        "vae_decoder": ({"latent_sample": latents[:1]}, "sample", decoded),
        "vae_encoder": ({"sample": image}, "latent_parameters", moments)}
    for name, (feeds, output, reference) in checks.items():
        runner, _ = load_runner(sd15_plans, device="cuda", component=name)
        with runner:
            got = runner.run({s.name: feeds[s.name].astype(s.dtype) for s in runner.inputs})[output]
        got = got[:, : reference.shape[1]]  # the encoder's engine gives the mean, then the log-variance
        assert got.shape == reference.shape and _cosine(got, reference) > 0.9999, name


def test_the_sd15_image_matches_onnxruntimes(sd15_onnx: Path, sd15_plans: Path) -> None:
    import enginekit

    call = dict(prompt="a red cube", num_inference_steps=4, guidance_scale=7.5, seed=0, height=64, width=64,
                output_type="np")
    with enginekit.load(sd15_onnx, device="cpu") as cpu, enginekit.load(sd15_plans, device="cuda") as gpu:
        reference, got = cpu(**call).images[0], gpu(**call).images[0]
    assert psnr(reference, got) > 35
