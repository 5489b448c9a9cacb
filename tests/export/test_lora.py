"""``export --lora``: LoRA files (diffusers/PEFT and kohya formats) fused into tiny-sd15's weights
by diffusers before export; the exported UNet moves away from the plain export and matches
diffusers' own fused pipeline; provenance records each file; bad files are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from enginekit.artifact import sha256_file  # noqa: E402
from enginekit.errors import SourceError  # noqa: E402

from ..conftest import psnr  # noqa: E402

_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _peft_state(seed: int, zero: bool = False, text: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT LoRA weights (rank 4, alpha 4) for tiny-sd15's UNet attention (and its CLIP's with
    ``text``), with random up-projections (PEFT initialises them to zero: they would change nothing)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from enginekit.export.diffusion.sources import resolve_pipeline

    pipe = resolve_pipeline("tiny-sd15").pipeline
    gen = torch.Generator().manual_seed(seed)
    out = {}
    parts = (("unet", _UNET_TARGETS), ("text_encoder", _TEXT_TARGETS)) if text else (("unet", _UNET_TARGETS),)
    for name, targets in parts:
        module = getattr(pipe, name)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"),
                                module)
        with torch.no_grad():
            for key, p in module.named_parameters():
                if "lora_B" in key and not zero:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        out[name] = get_peft_model_state_dict(module)
    return out


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("lora")
    state = _peft_state(seed=1)
    StableDiffusionPipeline.save_lora_weights(
        str(root), unet_lora_layers=convert_state_dict_to_diffusers(state["unet"]), weight_name="style.safetensors")
    flat = {f"unet.{k}": v for k, v in state["unet"].items()}
    kohya = convert_state_dict_to_kohya(flat)
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(root / "style_kohya.safetensors"))
    with_text = _peft_state(seed=3, text=True)
    StableDiffusionPipeline.save_lora_weights(
        str(root), unet_lora_layers=convert_state_dict_to_diffusers(with_text["unet"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(with_text["text_encoder"]),
        weight_name="with_text.safetensors")
    zero = _peft_state(seed=2, zero=True)
    StableDiffusionPipeline.save_lora_weights(
        str(root), unet_lora_layers=convert_state_dict_to_diffusers(zero["unet"]), weight_name="zero.safetensors")
    # A FLUX-layout LoRA: nothing in an SD 1.5 pipeline is called transformer.*
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4)},
              str(root / "flux_style.safetensors"))
    # The right names at the wrong width (a LoRA for a larger model of the same layout).
    key = next(k for k in state["unet"] if k.endswith("to_q.lora_A.weight"))  # PEFT names, as diffusers saves them
    save_file({f"unet.{key}": torch.randn(4, 999), f"unet.{key.replace('lora_A', 'lora_B')}": torch.randn(999, 4)},
              str(root / "wide.safetensors"))
    (root / "notes.txt").write_text("not a LoRA")
    (root / "style.bin").write_bytes(b"\x80\x04")
    return {p.stem: p for p in root.iterdir()}


def _unet_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
            "timestep": np.array([500.0, 20.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}


def _fused_reference(path: Path, scale: float) -> object:
    """diffusers' own: load_lora_weights + fuse_lora(lora_scale) + unload_lora_weights."""
    from enginekit.export.diffusion.sources import resolve_pipeline

    pipe = resolve_pipeline("tiny-sd15").pipeline
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe


def _torch_unet(pipe, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return pipe.unet(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                         torch.from_numpy(feeds["encoder_hidden_states"])).sample.numpy()


def _onnx_unet(art: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from enginekit.runtimes.onnxruntime import run_onnx_file

    return run_onnx_file(art / "unet" / "model.onnx", feeds)["out_sample"]


@pytest.fixture(scope="module")
def exports(lora_files: dict[str, Path], tiny_pipelines: dict, tmp_path_factory: pytest.TempPathFactory,
            ) -> dict[str, Path]:
    from enginekit.export.api import export_model

    root = tmp_path_factory.mktemp("lora-exports")
    # The plain export is the session's (same seed, nothing fused): read only here.
    out = {"plain": tiny_pipelines[("tiny-sd15", "onnx")], "diffusers": root / "diffusers", "kohya": root / "kohya"}
    export_model("tiny-sd15", out["diffusers"], loras=(f"{lora_files['style']}:0.8",))  # image check on
    export_model("tiny-sd15", out["kohya"], loras=(str(lora_files["style_kohya"]),), lora_scale=0.8,
                 image_check=False)
    return out


def _span_psnr(ref: np.ndarray, got: np.ndarray) -> float:
    """PSNR over the reference's own range (UNet outputs are not images in [0, 1])."""
    lo, hi = float(ref.min()), float(ref.max())
    return psnr((ref - lo) / (hi - lo), (got - lo) / (hi - lo))


def test_diffusers_format_lora_is_fused_and_matches_diffusers(exports: dict[str, Path],
                                                              lora_files: dict[str, Path]) -> None:
    from enginekit.manifest import read_manifest

    feeds = _unet_feeds()
    plain, fused = _onnx_unet(exports["plain"], feeds), _onnx_unet(exports["diffusers"], feeds)
    ref = _torch_unet(_fused_reference(lora_files["style"], 0.8), feeds)
    assert np.abs(fused - plain).max() > 0.05 * np.abs(plain).max(), "the LoRA changed nothing"
    assert _span_psnr(ref, fused) >= 40.0
    assert _span_psnr(ref, plain) < 40.0
    manifest = read_manifest(exports["diffusers"])
    (rec,) = manifest.provenance["lora"]
    assert rec["file"] == "style.safetensors" and rec["sha256"] == sha256_file(lora_files["style"])
    assert rec["scale"] == 0.8 and rec["format"] == "diffusers"
    assert rec["components"] == ["unet"] and rec["weights_changed"]["unet"] > 0
    assert manifest.fidelity["image"]["psnr_db"] >= 40.0  # the whole image against the fused diffusers pipeline
    assert "lora" not in read_manifest(exports["plain"]).provenance


def test_kohya_format_fuses_to_the_same_weights(exports: dict[str, Path], lora_files: dict[str, Path]) -> None:
    from enginekit.manifest import read_manifest

    feeds = _unet_feeds(1)
    kohya, diffusers_fmt = _onnx_unet(exports["kohya"], feeds), _onnx_unet(exports["diffusers"], feeds)
    ref = _torch_unet(_fused_reference(lora_files["style_kohya"], 0.8), feeds)
    assert _span_psnr(ref, kohya) >= 40.0
    assert _span_psnr(diffusers_fmt, kohya) >= 40.0
    (rec,) = read_manifest(exports["kohya"]).provenance["lora"]
    assert rec["format"] == "kohya" and rec["scale"] == 0.8
    assert rec["sha256"] == sha256_file(lora_files["style_kohya"])


def test_two_loras_fuse_in_order_and_are_both_recorded(lora_files: dict[str, Path]) -> None:
    from enginekit.export.diffusion.lora import LoraSpec, fuse_loras
    from enginekit.export.diffusion.sources import resolve_pipeline

    pipe = resolve_pipeline("tiny-sd15").pipeline
    records = fuse_loras(pipe, "sd15", [LoraSpec(lora_files["style"], 0.5), LoraSpec(lora_files["style_kohya"], 0.3)])
    assert [(r["file"], r["scale"]) for r in records] == [("style.safetensors", 0.5), ("style_kohya.safetensors", 0.3)]
    feeds = _unet_feeds(2)
    # the same LoRA twice at 0.5 and 0.3 is the LoRA once at 0.8 (fusion is additive in the weights)
    once = _torch_unet(_fused_reference(lora_files["style"], 0.8), feeds)
    assert _span_psnr(once, _torch_unet(pipe, feeds)) >= 40.0
    assert not pipe.get_list_adapters()  # no adapter layer is left to export


def test_text_encoder_loras_fuse_or_say_why_not(lora_files: dict[str, Path]) -> None:
    """diffusers loads text-encoder LoRAs through transformers' PEFT integration, which has its own
    peft floor: where it is met the text encoder is fused too, else the file is refused saying so."""
    from enginekit.export.diffusion.lora import LoraSpec, _text_encoder_peft_problem, fuse_loras
    from enginekit.export.diffusion.sources import resolve_pipeline

    pipe = resolve_pipeline("tiny-sd15").pipeline
    problem = _text_encoder_peft_problem()
    if problem:
        with pytest.raises(SourceError, match="text-encoder weights.*peft >="):
            fuse_loras(pipe, "sd15", [LoraSpec(lora_files["with_text"])])
    else:
        (rec,) = fuse_loras(pipe, "sd15", [LoraSpec(lora_files["with_text"])])
        assert rec["weights_changed"].get("text_encoder", 0) > 0


@pytest.mark.parametrize(("stem", "message"), [
    ("missing", "no such file"),
    ("style", "pickled files are never loaded"),  # the .bin twin
    ("notes", "must be a .safetensors file"),
    ("flux_style", "matches a module of this sd15 pipeline .* FLUX LoRA"),
    ("wide", "does not fit this sd15 pipeline"),
    ("zero", "changed no weight"),
])
def test_bad_loras_are_refused_and_nothing_is_written(stem: str, message: str, lora_files: dict[str, Path],
                                                      tmp_path: Path) -> None:
    from enginekit.export.api import export_model

    root = lora_files["style"].parent
    path = {"missing": root / "missing.safetensors", "style": root / "style.bin",
            "notes": root / "notes.txt"}.get(stem, lora_files.get(stem))
    with pytest.raises(SourceError, match=message):
        export_model("tiny-sd15", tmp_path / "out", loras=(str(path),), image_check=False)
    assert not (tmp_path / "out").exists()


def test_parse_lora_reads_the_scale() -> None:
    from enginekit.export.diffusion.lora import parse_lora

    assert parse_lora("a.safetensors:0.6").scale == 0.6
    assert parse_lora("a.safetensors", 0.8).scale == 0.8
    assert parse_lora("dir:x/a.safetensors", 0.8).path == Path("dir:x/a.safetensors")


def test_cli_lora_flags_and_errors(lora_files: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from enginekit.app.cli import cli
    from enginekit.manifest import read_manifest

    runner = CliRunner()
    result = runner.invoke(cli, ["export", "tiny-sd15", "--lora", str(lora_files["style"]), "--lora-scale", "0.5",
                                 "--no-image-check", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "a").provenance["lora"][0]["scale"] == 0.5
    result = runner.invoke(cli, ["export", "tiny-sd15", "--lora", str(lora_files["zero"]), "--no-image-check",
                                 "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and "changed no weight" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["export", "default", "--lora", str(lora_files["style"]), "-o", str(tmp_path / "c")])
    assert result.exit_code == 1 and "diffusion pipelines only" in result.output
