"""Inpainting models as sources: a diffusers inpainting folder is told and loaded as its
family with diffusers' inpainting class, a single file by its first convolution's 9 input
channels, and a UNet of any other width is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from enginekit.errors import ExportError, SourceError  # noqa: E402
from enginekit.export.diffusion.families import detect_family, get_family  # noqa: E402
from enginekit.export.diffusion.sources import _inpainting_config, config_dir, resolve_pipeline  # noqa: E402


def test_an_inpainting_folder_is_its_family_loaded_as_inpainting(tmp_path: Path) -> None:
    import diffusers

    twin = resolve_pipeline("tiny-sd15-inpainting").pipeline
    assert isinstance(twin, diffusers.StableDiffusionInpaintPipeline) and twin.unet.config.in_channels == 9
    twin.save_pretrained(tmp_path / "inp", safe_serialization=True)
    family, how, _ = detect_family(tmp_path / "inp")
    assert family.name == "sd15"
    src = resolve_pipeline(str(tmp_path / "inp"))
    assert type(src.pipeline).__name__ == "StableDiffusionInpaintPipeline" and src.family == "sd15"
    section = family.task_config(src.pipeline)
    assert section["inpainting"] is True and section["pipeline"] == "StableDiffusionInpaintPipeline"
    assert get_family("sdxl").task_config(resolve_pipeline("tiny-sdxl").pipeline)["inpainting"] is False


def test_a_single_file_is_told_inpainting_by_its_first_convolution() -> None:
    def header(channels: int) -> dict:
        return {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, channels, 3, 3, device="meta")}

    plain = config_dir("sd15")
    assert _inpainting_config(header(9), "sd15", plain) == config_dir("sd15-inpainting")
    assert _inpainting_config(header(9), "sdxl", config_dir("sdxl")) == config_dir("sdxl-inpainting")
    assert _inpainting_config(header(4), "sd15", plain) == plain
    with pytest.raises(SourceError, match="sd21 inpainting model, for which enginekit ships no config; pass --config"):
        _inpainting_config(header(9), "sd21", config_dir("sd21"))


def test_a_unet_of_another_width_is_refused() -> None:
    pipe = resolve_pipeline("tiny-sd15").pipeline
    pipe.unet.register_to_config(in_channels=5)
    with pytest.raises(ExportError, match="UNet takes 5 input channels: neither the VAE's 4 latent channels nor an "
                                          "inpainting UNet's 9"):
        get_family("sd15").task_config(pipe)
