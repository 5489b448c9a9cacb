"""Quantized diffusion pipelines: fp16 / int8 / int4 on ONNX Runtime and OpenVINO, gated on the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from enginekit.errors import FidelityError, InputError, QuantizationError
from enginekit.fidelity import ssim


def _available(backend: str) -> bool:
    from tests.conftest import installed_backends

    return backend in installed_backends()


# -- SSIM --------------------------------------------------------------------------


def test_ssim_matches_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.random((40, 56, 3))
    for noise in (0.02, 0.1, 0.3):
        b = np.clip(a + rng.normal(0, noise, a.shape), 0, 1)
        want = metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False, data_range=1.0)
        assert ssim(a, b) == pytest.approx(want, abs=1e-9)
    gray = rng.random((24, 24))
    want = metrics.structural_similarity(gray, gray * 0.5, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=1.0)
    assert ssim(gray, gray * 0.5) == pytest.approx(want, abs=1e-9)


def test_ssim_known_values() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((2, 32, 32, 3))
    assert ssim(a, a) == pytest.approx(1.0)
    # A constant image against its own shift: no variance, so only the luminance term: (2xy + c1) / (x² + y² + c1).
    flat = np.full((16, 16), 0.5)
    c1 = 0.01**2
    assert ssim(flat, flat + 0.1) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1))
    assert ssim(a, 1 - a) < 0
    with pytest.raises(ValueError, match="smaller than"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))


# -- the pipelines -------------------------------------------------------------------


CASES = [
    ("tiny-sd15", "onnxruntime", "fp16"), ("tiny-sd15", "onnxruntime", "int8"), ("tiny-sd15", "onnxruntime", "int4"),
    ("tiny-sd15", "openvino", "fp16"), ("tiny-sd15", "openvino", "int8"), ("tiny-sd15", "openvino", "int4"),
    ("tiny-sd3", "onnxruntime", "int8"), ("tiny-sd3", "onnxruntime", "int4"),
    ("tiny-sd3", "openvino", "fp16"), ("tiny-sd3", "openvino", "int8"), ("tiny-sd3", "openvino", "int4"),
]
# Every method on SD 1.5 by default, and the transformer's int8 and int4 on ONNX Runtime and int8 on
# OpenVINO; SD3 with OpenVINO fp16/int4 (the paths SD 1.5 runs on OpenVINO) under -m slow.
_SLOW_CASES = {("tiny-sd3", "openvino", "fp16"), ("tiny-sd3", "openvino", "int4")}


@pytest.mark.parametrize("name,backend,method", [
    pytest.param(*c, id="-".join(c), marks=pytest.mark.slow if c in _SLOW_CASES else ()) for c in CASES])
def test_quantized_pipeline_loads_generates_and_records_fidelity(
        tiny_pipelines: dict, tmp_path: Path, name: str, backend: str, method: str) -> None:
    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    import onnx

    import enginekit
    from enginekit.quant.diffusion import BUDGETS, quantize_pipeline

    out = tmp_path / "q"
    manifest = quantize_pipeline(tiny_pipelines[(name, "onnx")], out, method, backend=backend, group_size=16)
    assert manifest.kind == ("openvino" if backend == "openvino" else "onnx")
    denoiser = "unet" if name == "tiny-sd15" else "transformer"
    comps = manifest.quantization["components"]
    assert comps[denoiser]["method"] == method
    assert all(comps[e]["method"] == ("fp16" if method == "fp16" else "int8")
               for e in comps if e.startswith("text_encoder"))
    assert comps["vae_decoder"]["method"] == ("fp16" if method == "fp16" else "fp32")
    fid = manifest.fidelity
    assert fid["vs_parent"]["psnr_db"] >= BUDGETS[method][0] and fid["vs_parent"]["ssim"] >= BUDGETS[method][1]
    assert fid["vs_diffusers"]["psnr_db"] > 0 and -1 <= fid["vs_diffusers"]["ssim"] <= 1
    assert fid["judged_on"]["images"] == 4 and fid["judged_on"]["steps"] == 4
    assert denoiser in fid["components"] and 0.9 < fid["components"][denoiser]["min_cosine"] <= 1.0 + 1e-9
    if method == "int8":
        assert manifest.quantization["calibration"]["samples"] > 0
        assert manifest.quantization["calibration"]["prompts_used"] == 8
    # Structure: what the recipe put in the denoiser's graph.
    entry = out / manifest.components[denoiser].entry
    if backend == "onnxruntime":
        ops = {n.op_type for n in onnx.load(str(entry), load_external_data=False).graph.node}
        want = {"fp16": "Cast", "int4": "MatMulNBits"}.get(method)
        if method == "int8":
            want = "DequantizeLinear" if comps[denoiser]["variant"] == "static" else "DynamicQuantizeMatMul"
            assert ops & {"DequantizeLinear", "DynamicQuantizeMatMul", "MatMulInteger"}
        else:
            assert want in ops
    else:
        xml = entry.read_text()
        if method == "int8":
            assert "FakeQuantize" in xml and 'element_type="u8"' in xml
        elif method == "int4":
            assert 'element_type="i4"' in xml or 'element_type="u4"' in xml
        else:
            assert 'element_type="f16"' in xml
    with enginekit.load(out, device="cpu") as pipe:
        image = pipe("a boat", num_inference_steps=2, seed=3, output_type="np").images
    assert image.shape[-1] == 3 and np.isfinite(image).all()


@pytest.fixture(scope="module")
def sd15(tiny_pipelines: dict) -> Path:
    return tiny_pipelines[("tiny-sd15", "onnx")]


def test_gate_refuses_a_pipeline_under_budget_and_writes_nothing(sd15: Path, tmp_path: Path) -> None:
    from enginekit.quant.diffusion import quantize_pipeline

    out = tmp_path / "q"
    with pytest.raises(FidelityError, match=r"PSNR \d+\.\d+ dB < 90\.0 dB.*nothing was written") as err:
        quantize_pipeline(sd15, out, "int4", group_size=16, min_psnr=90.0, reference="parent")
    assert "4 images" in str(err.value)
    tries = str(err.value).split("To try: ", 1)[1]
    assert "--group-size 32" in tries and "-m int8" in tries and "--component unet=fp16" in tries
    assert "--min-psnr" in tries and "--auto-fallback" not in tries  # int4 has no fallback
    assert not out.exists() and not list(tmp_path.glob(".q*"))


def test_ort_int8_falls_back_from_static_to_weight_only(sd15: Path, tmp_path: Path) -> None:
    """The static QDQ denoiser is tried first; when its image misses, weight-only int8 is
    gated instead and the manifest says which variant was kept and what the first one scored."""
    from enginekit.quant.diffusion import quantize_pipeline

    first = quantize_pipeline(sd15, tmp_path / "a", "int8", min_psnr=0.0, min_ssim=-1.0, reference="parent",
                              calibration_prompts=2)
    static = first.fidelity["vs_parent"]["psnr_db"]
    assert first.quantization["components"]["unet"]["variant"] == "static"
    manifest = quantize_pipeline(sd15, tmp_path / "b", "int8", min_psnr=static + 0.5, min_ssim=-1.0,
                                 reference="parent", calibration_prompts=2)
    comp = manifest.quantization["components"]["unet"]
    assert comp["variant"] == "weight-only" and comp["recipe"] == "int8-dynamic"
    steps = manifest.quantization["fallback"]["steps"]
    assert steps[0]["variant"] == "static" and steps[0]["psnr_db"] == pytest.approx(static)


@pytest.mark.slow  # about 45 s: a sensitivity pass and one more quantization
@pytest.mark.skipif(not _available("openvino"), reason="openvino is not installed")
def test_auto_fallback_keeps_sensitive_layers_in_float(sd15: Path, tmp_path: Path) -> None:
    from enginekit.quant.diffusion import quantize_pipeline

    plain = quantize_pipeline(sd15, tmp_path / "a", "int8", backend="openvino", min_psnr=0.0, min_ssim=-1.0,
                              reference="parent", calibration_prompts=2)
    reached = plain.fidelity["vs_parent"]["psnr_db"]
    target = reached + 1.0
    manifest = quantize_pipeline(sd15, tmp_path / "b", "int8", backend="openvino", min_psnr=target, min_ssim=-1.0,
                                 reference="parent", calibration_prompts=2, auto_fallback=True)
    fallback = manifest.quantization["fallback"]
    assert fallback["excluded"] > 0 and len(manifest.quantization["excluded_nodes"]) == fallback["excluded"]
    assert fallback["steps"][0]["psnr_db"] == pytest.approx(reached, abs=0.5)
    assert manifest.fidelity["vs_parent"]["psnr_db"] >= target


@pytest.mark.skipif(not _available("openvino"), reason="openvino is not installed")
def test_mixed_precision_search_finds_the_layers_known_to_be_worst(tmp_path: Path) -> None:
    """A tiny SD 1.5 UNet with two known worst layers: each of two ResNet blocks feeds its ``conv2``
    one extra channel held at 500 (``norm2``'s scale 0, bias 500) that ``conv2`` ignores (its weights
    on it are 0). The float image does not see that channel; int8's per-tensor activation range
    does: every other input of those two convolutions rounds to a step of ~2. The search must rank
    exactly those two first, keep them in float in its first step and meet the budget there."""
    torch = pytest.importorskip("torch")
    from enginekit.export.diffusion.sd import export_pipeline
    from enginekit.export.diffusion.sources import resolve_pipeline
    from enginekit.quant.diffusion import quantize_pipeline

    pipe = resolve_pipeline("tiny-sd15").pipeline
    planted = ("down_blocks.1.resnets.0", "up_blocks.1.resnets.0")
    with torch.no_grad():
        for name in planted:
            block = pipe.unet.get_submodule(name)
            block.norm2.weight[0], block.norm2.bias[0] = 0.0, 500.0
            block.conv2.weight[:, 0] = 0.0
    pipe.save_pretrained(tmp_path / "folder")
    export_pipeline(str(tmp_path / "folder"), tmp_path / "onnx")
    target = 32.0
    manifest = quantize_pipeline(tmp_path / "onnx", tmp_path / "q", "int8", backend="openvino", min_psnr=target,
                                 min_ssim=-1.0, reference="parent", calibration_prompts=2, auto_fallback=True)
    fallback = manifest.quantization["fallback"]
    first, *rest = fallback["steps"]
    assert first["excluded"] == 0 and first["psnr_db"] < target - 6  # all-int8 misses by far
    assert rest == []  # converged at its first step
    kept = manifest.quantization["excluded_nodes"]
    assert {n.split("/")[2] + "/" + n.split("/")[3] for n in kept[:2]} == {
        "down_blocks.1/resnets.0", "up_blocks.1/resnets.0"} and all("/conv2/" in n for n in kept[:2])
    assert fallback["excluded"] == len(kept) <= 8  # a tenth of the ranking, not the whole UNet
    assert manifest.fidelity["vs_parent"]["psnr_db"] >= target


def test_calibration_prompts_file_and_bad_files(sd15: Path, tmp_path: Path) -> None:
    from enginekit.quant.diffusion import quantize_pipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green field\n\n  a cat on a sofa  \na city at night\n", encoding="utf-8")
    manifest = quantize_pipeline(sd15, tmp_path / "q", "int8", calibration=str(prompts), calibration_prompts=2,
                                 calibration_steps=3, min_psnr=0.0, min_ssim=-1.0, reference="parent")
    calib = manifest.quantization["calibration"]
    assert calib["source"] == str(prompts) and calib["prompts"] == 3 and calib["prompts_used"] == 2
    # 2 prompts x 3 steps, one denoiser call each (CFG in one batch of 2)
    assert calib["denoiser_calls"] == 6 and calib["samples"] == 6 and calib["batch"] == 2
    assert len(calib["sha256"]) == 64
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(InputError, match="empty"):
        quantize_pipeline(sd15, tmp_path / "x", "int8", calibration=str(empty))
    with pytest.raises(InputError, match="no such prompts file"):
        quantize_pipeline(sd15, tmp_path / "x", "int8", calibration=str(tmp_path / "missing.txt"))
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(InputError, match="UTF-8"):
        quantize_pipeline(sd15, tmp_path / "x", "int8", calibration=str(binary))
    assert not (tmp_path / "x").exists()


def test_component_override_and_bad_names(sd15: Path, tmp_path: Path) -> None:
    from enginekit.errors import OptionError
    from enginekit.quant.diffusion import PipelineQuantOptions, quantize_pipeline

    options = PipelineQuantOptions(group_size=16, components={"vae_decoder": "fp16", "text_encoder": "fp32"},
                                   reference="parent")
    manifest = quantize_pipeline(sd15, tmp_path / "q", "int4", options)
    comps = manifest.quantization["components"]
    assert comps["vae_decoder"]["method"] == "fp16" and comps["vae_decoder"]["note"] == "set by the caller"
    assert comps["text_encoder"]["method"] == "fp32" and manifest.components["text_encoder"].precision == "fp32"
    assert manifest.components["vae_decoder"].precision == "fp16"
    assert "text_encoder" not in manifest.fidelity["components"]  # float: nothing to compare
    with pytest.raises(QuantizationError, match="unknown component 'unnet'.*unet"):
        quantize_pipeline(sd15, tmp_path / "x", "int8", components={"unnet": "int8"})
    with pytest.raises(QuantizationError, match="unknown method 'int3' for component 'unet'"):
        quantize_pipeline(sd15, tmp_path / "x", "int8", components={"unet": "int3"})
    with pytest.raises(QuantizationError, match="unknown method 'int8-static' for a pipeline"):
        quantize_pipeline(sd15, tmp_path / "x", "int8-static")
    with pytest.raises(QuantizationError, match="auto-fallback"):
        quantize_pipeline(sd15, tmp_path / "x", "int4", auto_fallback=True)
    with pytest.raises(OptionError, match="PipelineQuantOptions has no field 'group'"):
        quantize_pipeline(sd15, tmp_path / "x", "int4", options, group=16)


def test_sdxl_vae_stays_fp32_at_fp16(tiny_pipelines: dict) -> None:
    from enginekit.manifest import read_manifest
    from enginekit.quant.diffusion import default_plan

    plan, notes = default_plan(read_manifest(tiny_pipelines[("tiny-sdxl", "onnx")]), "fp16")
    assert plan["unet"] == "fp16" and plan["text_encoder_2"] == "fp16"
    assert plan["vae_decoder"] == "fp32" and "overflows in fp16" in notes["vae_decoder"]


def test_cli_quantizes_a_pipeline_and_refuses_classifier_flags(sd15: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from enginekit.app.cli import cli

    runner = CliRunner()
    out = tmp_path / "q"
    res = runner.invoke(cli, ["quantize", str(sd15), "-o", str(out), "-m", "fp16", "--component",
                              "vae_decoder=fp32", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["quantization"]["components"]["vae_decoder"]["method"] == "fp32"
    assert data["fidelity"]["vs_parent"]["psnr_db"] >= 35
    res = runner.invoke(cli, ["quantize", str(sd15), "-o", str(tmp_path / "x"), "-m", "int8", "--eval-data",
                              "photos", "--exclude", "n1"])
    assert res.exit_code == 2 and "--eval-data, --exclude: classifier options" in res.output
    res = runner.invoke(cli, ["quantize", str(sd15), "-o", str(tmp_path / "x"), "-m", "int8", "--component", "unet"])
    assert res.exit_code == 2 and "NAME=METHOD" in res.output
    res = runner.invoke(cli, ["quantize", str(sd15), "-o", str(tmp_path / "x"), "-m", "int8", "--component",
                              "vae=fp16"])
    assert res.exit_code == 1 and "unknown component 'vae'" in res.output
    res = runner.invoke(cli, ["quantize", str(sd15), "-o", str(tmp_path / "x"), "-m", "int4", "--group-size", "16",
                              "--min-psnr", "95"])
    assert res.exit_code == 1 and "< 95.0 dB" in res.output and not (tmp_path / "x").exists()


def test_cli_refuses_pipeline_flags_for_a_classifier(exported: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from enginekit.app.cli import cli

    res = CliRunner().invoke(cli, ["quantize", str(exported["timm"]), "-o", str(tmp_path / "x"), "-m", "fp16",
                                   "--min-psnr", "30"])
    assert res.exit_code == 2 and "--min-psnr: pipeline options" in res.output
