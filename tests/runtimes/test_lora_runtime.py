"""LoRA at run time (``pipe(..., loras={file: scale})``) on ONNX Runtime and OpenVINO: the image
matches diffusers' ``load_lora_weights`` + ``set_adapters`` on the same latents (diffusers/PEFT and
kohya files, UNet and text encoders, two files at their own scales, SDXL's two encoders, an fp16
OpenVINO engine); a call without LoRA is the base model exactly; bad files are one line and leave
nothing applied; the weight map survives compile and an artifact without it is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from enginekit.errors import InputError  # noqa: E402

from ..conftest import installed_backends, psnr, twin_cache  # noqa: E402

BACKENDS = [b for b in ("onnxruntime", "openvino") if b in installed_backends()]
_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
_twin = twin_cache()
_STEPS, _SIZE = 3, 64


def _peft(name: str, parts: dict[str, list[str]], seed: int, alpha: int = 4) -> dict[str, dict]:
    """PEFT LoRA weights (rank 4, ``alpha``) for a fresh twin's components, random up-projections."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from enginekit.export.diffusion.sources import resolve_pipeline

    pipe = resolve_pipeline(name).pipeline
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for comp, targets in parts.items():
        module = getattr(pipe, comp)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"),
                                module)
        with torch.no_grad():
            for key, p in module.named_parameters():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        out[comp] = get_peft_model_state_dict(module)
    return out


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers as to_diffusers
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("loras")
    a = _peft("tiny-sd15", {"unet": _ATTN, "text_encoder": _TEXT}, seed=1)
    StableDiffusionPipeline.save_lora_weights(str(root), unet_lora_layers=to_diffusers(a["unet"]),
                                              text_encoder_lora_layers=to_diffusers(a["text_encoder"]),
                                              weight_name="ink.safetensors")
    flat = {f"unet.{k}": v for k, v in a["unet"].items()} | {f"text_encoder.{k}": v for k, v in a["text_encoder"].items()}
    save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(flat).items()}, str(root / "ink_kohya.safetensors"))
    # a feed-forward Linear beside an attention one; 1x1 and 3x3 convolutions (proj_in, resnet conv1:
    # LoCon) in a file of their own (diffusers 0.42 drops the Linear layers of a file that mixes them)
    for stem, targets, seed in (("ff", ["to_v", "ff.net.2"], 2), ("conv", ["proj_in", "conv1"], 4)):
        b = _peft("tiny-sd15", {"unet": targets}, seed=seed)
        StableDiffusionPipeline.save_lora_weights(str(root), unet_lora_layers=to_diffusers(b["unet"]),
                                                  weight_name=f"{stem}.safetensors")
    # PEFT's lora_alpha != rank, which only diffusers' lora_adapter_metadata header entry says
    c = _peft("tiny-sd15", {"unet": _ATTN}, seed=5, alpha=8)
    StableDiffusionPipeline.save_lora_weights(str(root), unet_lora_layers=to_diffusers(c["unet"]),
                                              unet_lora_adapter_metadata=LoraConfig(
                                                  r=4, lora_alpha=8, target_modules=_ATTN).to_dict(),
                                              weight_name="alpha8.safetensors")
    xl = _peft("tiny-sdxl", {"unet": _ATTN, "text_encoder": _TEXT, "text_encoder_2": _TEXT}, seed=3)
    StableDiffusionXLPipeline.save_lora_weights(str(root), unet_lora_layers=to_diffusers(xl["unet"]),
                                                text_encoder_lora_layers=to_diffusers(xl["text_encoder"]),
                                                text_encoder_2_lora_layers=to_diffusers(xl["text_encoder_2"]),
                                                weight_name="xl.safetensors")
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4)},
              str(root / "flux_style.safetensors"))
    (root / "style.bin").write_bytes(b"\x80\x04K\x01.")
    (root / "pickle.safetensors").write_bytes(b"\x80\x04K\x01.")
    return {p.stem: p for p in root.iterdir()} | {"pickled_bin": root / "style.bin"}


def _kwargs(latents: np.ndarray) -> dict:
    return dict(num_inference_steps=_STEPS, guidance_scale=7.5, height=_SIZE, width=_SIZE, latents=latents,
                output_type="np", scheduler="euler")


def _latents(name: str, seed: int = 0) -> np.ndarray:
    channels = 4
    return np.random.default_rng(seed).standard_normal((1, channels, _SIZE // 8, _SIZE // 8), dtype=np.float32)


def _diffusers(name: str, files: list[tuple[Path, float]], latents: np.ndarray) -> np.ndarray:
    """diffusers' own: load_lora_weights + set_adapters(names, weights), Euler, the same latents."""
    from diffusers import EulerDiscreteScheduler

    pipe = _twin(name)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    try:
        for i, (path, _) in enumerate(files):
            pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
        pipe.set_adapters([f"a{i}" for i in range(len(files))], [s for _, s in files])
        return pipe("a lighthouse", num_inference_steps=_STEPS, guidance_scale=7.5, height=_SIZE, width=_SIZE,
                    latents=torch.from_numpy(latents), output_type="np").images
    finally:
        pipe.unload_lora_weights()


@pytest.fixture(scope="module")
def pipes(tiny_pipelines: dict) -> dict:
    import enginekit

    opened: dict = {}

    def get(name: str, backend: str):
        if (name, backend) not in opened:
            opened[(name, backend)] = enginekit.load(tiny_pipelines[(name, backend)])
        return opened[(name, backend)]

    yield get
    for pipe in opened.values():
        pipe.close()


CASES = {"diffusers": [("ink", 0.8)], "kohya": [("ink_kohya", 0.8)], "two": [("ink", 0.6), ("ff", -0.7)],
         "conv": [("conv", 0.9)], "alpha": [("alpha8", 0.5)]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_set_adapters(case: str, backend: str, pipes, loras: dict[str, Path]) -> None:
    pipe, lat = pipes("tiny-sd15", backend), _latents("tiny-sd15")
    files = [(loras[stem], scale) for stem, scale in CASES[case]]
    out = pipe("a lighthouse", loras={str(p): s for p, s in files}, **_kwargs(lat))
    want = _diffusers("tiny-sd15", files, lat)
    assert psnr(want, out.images) >= 40.0
    base = pipe("a lighthouse", **_kwargs(lat)).images
    assert psnr(base, out.images) < 35.0, "the LoRA changed nothing"
    assert [(r["name"], r["scale"]) for r in out.loras] == [(p.stem, s) for p, s in files]
    if case == "diffusers":
        assert out.loras[0]["layers"] > 20  # UNet and text encoder layers


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdxl_both_text_encoders(backend: str, pipes, loras: dict[str, Path]) -> None:
    pipe, lat = pipes("tiny-sdxl", backend), _latents("tiny-sdxl")
    out = pipe("a lighthouse", loras={loras["xl"]: 0.9}, **_kwargs(lat))
    assert psnr(_diffusers("tiny-sdxl", [(loras["xl"], 0.9)], lat), out.images) >= 40.0
    switch = pipe.lora_switch
    (entry,) = switch._cache.values()
    assert set(entry.runners) == {"unet", "text_encoder", "text_encoder_2"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_lora_is_the_base_model_exactly_and_a_repeat_reuses_the_engines(
        backend: str, pipes, loras: dict[str, Path], tiny_pipelines: dict) -> None:
    import enginekit

    pipe, lat = pipes("tiny-sd15", backend), _latents("tiny-sd15", 1)
    first = pipe("a lighthouse", loras={loras["ink"]: 0.5}, **_kwargs(lat)).images
    runners = dict(next(iter(pipe.lora_switch._cache.values())).runners)
    again = pipe("a lighthouse", loras={loras["ink"]: 0.5}, **_kwargs(lat)).images
    assert np.array_equal(first, again)
    assert next(iter(pipe.lora_switch._cache.values())).runners == runners  # nothing rebuilt
    after = pipe("a lighthouse", **_kwargs(lat)).images
    with enginekit.load(tiny_pipelines[("tiny-sd15", backend)]) as fresh:
        assert np.array_equal(after, fresh("a lighthouse", **_kwargs(lat)).images)
    # bytes work as paths do, and a scale of 0 is the base model
    assert np.array_equal(pipe("a lighthouse", loras={loras["ink"].read_bytes(): 0.5}, **_kwargs(lat)).images, first)
    assert np.array_equal(pipe("a lighthouse", loras={loras["ink"]: 0}, **_kwargs(lat)).images, after)


BAD = {
    "missing": (lambda f: f["ink"].with_name("nope.safetensors"), 0.8, "no such file"),
    "pickled_bin": (lambda f: f["pickled_bin"], 0.8, "pickled files are never loaded"),
    "pickle": (lambda f: f["pickle"], 0.8, "pickled .*never loaded"),
    "sdxl_on_sd15": (lambda f: f["xl"], 0.8, "does not fit this sd15 pipeline: layer .* (has shape|does not exist)"),
    "scale": (lambda f: f["ink"], 11.0, "scale must be a number between -10 and 10"),
    "nothing": (lambda f: f["flux_style"], 0.8, "none of its 1 layers matches"),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_loras_are_one_line_and_leave_nothing_applied(backend: str, pipes, loras: dict[str, Path]) -> None:
    pipe, lat = pipes("tiny-sd15", backend), _latents("tiny-sd15", 2)
    base = pipe("a lighthouse", **_kwargs(lat)).images
    for case, (path, scale, message) in BAD.items():
        with pytest.raises(InputError, match=message) as info:
            pipe("a lighthouse", loras={path(loras): scale}, **_kwargs(lat))
        assert "\n" not in str(info.value), case
        assert np.array_equal(pipe("a lighthouse", **_kwargs(lat)).images, base), case


def test_map_is_recorded_relinked_and_required(tiny_pipelines: dict, loras: dict[str, Path], tmp_path: Path) -> None:
    import enginekit
    from enginekit.artifact import write_manifest
    from enginekit.manifest import read_manifest

    onnx_map = json.loads((tiny_pipelines[("tiny-sd15", "onnx")] / "lora_map.json").read_text())
    assert set(onnx_map["components"]) == {"unet", "text_encoder"} and not onnx_map.get("unmatched")
    for backend in BACKENDS:
        compiled = json.loads((tiny_pipelines[("tiny-sd15", backend)] / "lora_map.json").read_text())
        assert {c: set(m) for c, m in compiled["components"].items()} == \
            {c: set(m) for c, m in onnx_map["components"].items()}
    # an artifact from before run-time LoRA: refused in one line, still generates without
    old = tmp_path / "old"
    shutil.copytree(tiny_pipelines[("tiny-sd15", "onnx")], old)
    manifest = read_manifest(old)
    write_manifest(old, manifest.replace(assets=tuple(a for a in manifest.assets if a.path != "lora_map.json")))
    (old / "lora_map.json").unlink()
    with enginekit.load(old) as pipe:
        with pytest.raises(InputError, match="without the weight map .* export it again"):
            pipe("a lighthouse", loras={loras["ink"]: 0.8}, **_kwargs(_latents("tiny-sd15")))


@pytest.mark.skipif("openvino" not in BACKENDS, reason="openvino is not installed")
def test_fp16_openvino_keeps_working(tiny_pipelines: dict, loras: dict[str, Path], tmp_path: Path) -> None:
    import enginekit
    from enginekit.api import compile_artifact
    from enginekit.engine import CompileOptions

    compile_artifact(tiny_pipelines[("tiny-sd15", "onnx")], "openvino", tmp_path / "ov16",
                     CompileOptions(extra={"precision": "fp16"}))
    lat = _latents("tiny-sd15")
    with enginekit.load(tmp_path / "ov16") as pipe:
        out = pipe("a lighthouse", loras={loras["ink"]: 0.8}, **_kwargs(lat)).images
        (entry,) = pipe.lora_switch._cache.values()
        assert set(entry.runners) == {"unet", "text_encoder"}
    assert psnr(_diffusers("tiny-sd15", [(loras["ink"], 0.8)], lat), out) >= 30.0  # fp16 weights


# OpenVINO's int8 (NNCF hybrid: a calibration pass first) patches the same decompression chains as int4: -m slow.
@pytest.mark.parametrize("backend,method", [pytest.param("openvino", "int8", marks=pytest.mark.slow),
                                            ("openvino", "int4"), ("onnxruntime", "int8")])
def test_quantized_pipelines_take_loras(backend: str, method: str, tiny_pipelines: dict, loras: dict[str, Path],
                                        tmp_path: Path) -> None:
    """OpenVINO's int8 (NNCF hybrid) and int4 engines take LoRA at run time: the map follows the
    weights into their compressed form and the LoRA layers are patched as float weights. ONNX
    Runtime's integer weights cannot be patched: refused in one line naming why."""
    if backend not in BACKENDS:
        pytest.skip(f"{backend} is not installed")
    import enginekit
    from enginekit.quant.diffusion import quantize_pipeline

    source, out = tiny_pipelines[("tiny-sd15", "onnx")], tmp_path / "q"
    quantize_pipeline(source, out, method, backend=backend, group_size=16, min_psnr=0.0, min_ssim=-1.0,
                      reference="parent")
    lat, ink = _latents("tiny-sd15"), {loras["ink"]: 0.8}
    with enginekit.load(source) as pipe:
        float_base = pipe("a lighthouse", **_kwargs(lat)).images
        float_lora = pipe("a lighthouse", loras=ink, **_kwargs(lat)).images
    weights = json.loads((out / "lora_map.json").read_text())
    with enginekit.load(out) as pipe:
        base = pipe("a lighthouse", **_kwargs(lat)).images
        if backend == "onnxruntime":
            assert weights["left_out"]["unet"] > 0
            with pytest.raises(InputError, match="not a float weight in this engine .* quantized") as info:
                pipe("a lighthouse", loras=ink, **_kwargs(lat))
            assert "\n" not in str(info.value)
            assert np.array_equal(pipe("a lighthouse", **_kwargs(lat)).images, base)
            return
        float_map = json.loads((source / "lora_map.json").read_text())["components"]
        assert {c: set(m) for c, m in weights["components"].items()} == {c: set(m) for c, m in float_map.items()}
        assert "left_out" not in weights
        lora = pipe("a lighthouse", loras=ink, **_kwargs(lat)).images
        assert np.array_equal(pipe("a lighthouse", **_kwargs(lat)).images, base)  # the quantized base again
    # the LoRA is applied (far closer to the float LoRA image than the base is), and what is left is
    # the quantization's own error (the quantized base against the float base)
    assert psnr(float_lora, lora) > psnr(float_lora, base) + 3.0
    assert psnr(float_lora, lora) >= psnr(float_base, base) - 1.0


#: name -> (latent shape at 64x64: SD3's unpacked, FLUX's packed tokens, the call's own arguments)
_DIT_CALLS = {
    "tiny-sd3": ((1, 16, _SIZE // 8, _SIZE // 8), dict(negative_prompt="blurry", guidance_scale=5.0,
                                                        max_sequence_length=32)),
    "tiny-flux": ((1, (_SIZE // 16) ** 2, 64), dict(guidance_scale=3.5, max_sequence_length=64)),
}


@pytest.fixture(scope="module")
def dit_loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """diffusers-format LoRA files for the tiny SD3 and FLUX transformers (attention projections)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from diffusers.utils import convert_state_dict_to_diffusers as to_diffusers

    root = tmp_path_factory.mktemp("dit-loras")
    for name, cls, seed in (("tiny-sd3", StableDiffusion3Pipeline, 11), ("tiny-flux", FluxPipeline, 12)):
        layers = _peft(name, {"transformer": _ATTN}, seed=seed)
        cls.save_lora_weights(str(root), transformer_lora_layers=to_diffusers(layers["transformer"]),
                              weight_name=f"{name}.safetensors")
    return {p.stem: p for p in root.iterdir()}


# One backend per family by default (SD3 on ONNX Runtime, FLUX on OpenVINO), the other two under -m slow.
_DIT_CASES = [pytest.param(name, backend, marks=() if (name, backend) in
                           (("tiny-sd3", "onnxruntime"), ("tiny-flux", "openvino")) else pytest.mark.slow)
              for name in _DIT_CALLS for backend in BACKENDS]


@pytest.mark.parametrize("name,backend", _DIT_CASES)
def test_sd3_and_flux_transformers_match_diffusers(name: str, backend: str, pipes, dit_loras: dict[str, Path]) -> None:
    shape, call = _DIT_CALLS[name]
    lat = np.random.default_rng(4).standard_normal(shape, dtype=np.float32)
    kwargs = dict(num_inference_steps=_STEPS, height=_SIZE, width=_SIZE, output_type="np", **call)
    pipe = pipes(name, backend)
    # a strong scale: at 0.8 this rank-4 LoRA moves the tiny transformers' images by under 0.5%
    out = pipe("a lighthouse", loras={dit_loras[name]: 6.0}, latents=lat, **kwargs)
    twin = _twin(name)
    try:
        twin.load_lora_weights(str(dit_loras[name]), adapter_name="a0")
        twin.set_adapters(["a0"], [6.0])
        with torch.inference_mode():
            want = twin("a lighthouse", latents=torch.from_numpy(lat), **kwargs).images
    finally:
        twin.unload_lora_weights()
    assert psnr(want, out.images) >= 40.0
    assert psnr(pipe("a lighthouse", latents=lat, **kwargs).images, out.images) < 35.0, "the LoRA changed nothing"
    assert out.loras[0]["layers"] > 4


def test_weights_are_found_by_value_when_rounded() -> None:
    """The map's search for a quantized engine's weights: exact hits first, then the closest tensor
    of the same size in some layout, only within the rounding's reach and only when unambiguous."""
    from enginekit.runtimes.lora_map import match_weights

    rng = np.random.default_rng(0)
    weights = {m: rng.standard_normal((64, 96)).astype(np.float32) for m in ("a", "b", "c")}
    weights["conv"] = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)

    def rounded(w: np.ndarray) -> np.ndarray:  # int4-like: 16 levels over each row's range
        step = (w.max(axis=-1, keepdims=True) - w.min(axis=-1, keepdims=True)) / 15
        return (np.round(w / step) * step).astype(np.float32)

    tensors = [("t_b", rounded(weights["b"]).T.copy()),      # transposed, as a MatMul holds a Linear's
               ("t_a", rounded(weights["a"])),
               ("exact_c", weights["c"].astype(np.float16)),   # stayed float (fp16)
               ("other", rng.standard_normal((64, 96)).astype(np.float32)),
               ("t_conv", rounded(weights["conv"]))]
    found, missing = match_weights(weights, iter(tensors), near=True)
    assert {m: (e["tensor"], e["transposed"]) for m, e in found.items()} == \
        {"a": ("t_a", False), "b": ("t_b", True), "c": ("exact_c", False), "conv": ("t_conv", False)}
    assert missing == []
    assert match_weights(weights, iter(tensors))[1] == ["a", "b", "conv"]  # exact only: the rounded are not found
    # two weights whose closest tensor is the same one: neither gets it
    twins = {"x": weights["a"], "y": weights["a"] + 0.01}
    assert match_weights(twins, iter([("t", rounded(weights["a"]))]), near=True)[0] == {}
    # nothing of the right size within reach: not found
    assert match_weights({"a": weights["a"]}, iter([("other", tensors[3][1])]), near=True)[0] == {}
