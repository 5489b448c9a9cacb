"""The diffusion family registry (export side) and the runtime layouts it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from enginekit.errors import ManifestError, SourceError
from enginekit.export.diffusion import families as F
from enginekit.export.diffusion.sources import ARCHITECTURES, BUILTINS, config_dir
from enginekit.runtimes.tasks.layouts import ClipLayout, FluxLayout, SD3Layout, layout_for, layout_names
from enginekit.runtimes.tasks.pipeline_config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]


def test_every_family_is_registered_with_resolvable_configs() -> None:
    assert F.family_names() == ("sd15", "sd21", "sdxl", "sd3", "flux")  # the names manifests record
    for fam in F.families():
        assert fam.layout in layout_names(), fam.name
        for name in (*fam.configs, *fam.builtins):
            folder = config_dir(name)
            detected, _, _ = F.detect_family(folder)
            assert detected is fam, (name, detected.name)
            assert F.family_of_config(name) is fam
    # sources' tables come from the registry: nothing listed twice, nothing missing
    assert set(BUILTINS) == {b for f in F.families() for b in f.builtins}
    assert set(ARCHITECTURES) == {c for f in F.families() for c in f.configs}
    assert {"sd3-medium", "sd35-medium", "sd35-large"} <= set(F.get_family("sd3").configs)


def test_unknown_family_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(SourceError) as info:
        F.get_family("sd9")
    message = str(info.value)
    assert "\n" not in message and "'sd9'" in message
    assert all(name in message for name in F.family_names())


def test_detection_from_a_model_index_in_tmp_path(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 1024}))
    fam, how, certain = F.detect_family(tmp_path)
    assert (fam.name, how, certain) == ("sd21", "unet cross_attention_dim 1024", True)
    # a non-standard width: told by the text encoder's activation, not certainly
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 320}))
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({"hidden_act": "quick_gelu"}))
    fam, how, certain = F.detect_family(tmp_path)
    assert (fam.name, certain) == ("sd15", False)
    assert F.check_family("x", "sd15", "sd21", how=how, certain=certain) == "sd21"  # --family decides
    with pytest.raises(SourceError, match="a sd15 pipeline by its text encoder activation 'quick_gelu', not sdxl"):
        F.check_family("x", "sd15", "sdxl", how=how, certain=certain)
    assert F.detect_family({"_class_name": "FluxPipeline"})[0].name == "flux"
    with pytest.raises(SourceError, match="names 'KandinskyPipeline'; the export takes .*FluxPipeline"):
        F.detect_family({"_class_name": "KandinskyPipeline"})


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    saved = dict(F._REGISTRY)
    monkeypatch.setattr(F, "_REGISTRY", saved)
    return saved


def test_a_new_family_is_one_registry_entry(registry: dict, tmp_path: Path) -> None:
    @F.register_family
    def sd15_lcm() -> F.DiffusionFamily:
        return F.UNetFamily(name="sd15-lcm", title="LCM", pipeline_class="LatentConsistencyModelPipeline",
                            layout="clip", configs=("tiny-sd15",), has_safety_checker=True,
                            defaults=F.CallDefaults(steps=4, guidance_scale=8.0, scheduler="lcm"))

    assert "sd15-lcm" in F.family_names()
    folder = tmp_path / "lcm"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "LatentConsistencyModelPipeline"}))
    fam, how, certain = F.detect_family(folder)
    assert (fam.name, how, certain) == ("sd15-lcm", "pipeline class", True)
    assert F.family_of_config("tiny-sd15") is not None
    assert fam.pipeline_kwargs({}, loading=True)["safety_checker"] is None
    assert fam.no_t5_error() == "sd15-lcm has no T5 encoder"
    assert F.CallDefaults(steps=4, guidance_scale=8.0, scheduler="lcm").section() == {
        "default_steps": 4, "default_guidance_scale": 8.0, "default_scheduler": "lcm"}
    with pytest.raises(ValueError, match="registered twice"):
        F.register_family(sd15_lcm)


def test_family_rules() -> None:
    assert F.get_family("sd3").no_t5_error() is None
    assert "cannot run without it" in str(F.get_family("flux").no_t5_error())
    assert F.get_family("sdxl").vae_honours_upcast and not F.get_family("sd15").vae_honours_upcast
    flux = F.get_family("flux")
    assert isinstance(flux, F.FluxFamily)
    assert (flux.variants["schnell"].steps, flux.variants["schnell"].guidance_scale) == (4, 0.0)
    assert (flux.variants["dev"].steps, flux.variants["dev"].max_sequence_length) == (28, 512)


def _section(**extra: object) -> dict:
    return {"pipeline": "P", "text_encoders": [{"component": "text_encoder", "tokenizer": "tokenizer"}],
            "tokenizers": {"tokenizer": {"kind": "clip", "max_length": 77}}, "scheduler": {},
            "latent_channels": 4, "vae_scale_factor": 8, "vae_scaling_factor": 0.18, "sample_size": 8, **extra}


@pytest.mark.parametrize(("extra", "cls"), [
    ({}, ClipLayout),                                   # the oldest manifests: neither field
    ({"prompt_layout": "sd3"}, SD3Layout),              # written before `layout`
    ({"prompt_layout": "flux"}, FluxLayout),
    ({"layout": "flux"}, FluxLayout),                   # written now
    ({"layout": "sd3", "prompt_layout": "clip"}, SD3Layout),  # `layout` wins
])
def test_layout_is_chosen_by_the_manifest(extra: dict, cls: type) -> None:
    assert type(layout_for(PipelineConfig.from_section(_section(**extra)))) is cls


def test_unknown_layout_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError, match="unknown pipeline layout 'wan'; this enginekit runs clip, flux, sd3"):
        layout_for(PipelineConfig.from_section(_section(layout="wan")))


def test_layout_shapes_and_defaults() -> None:
    clip = layout_for(PipelineConfig.from_section(_section()))
    flux = layout_for(PipelineConfig.from_section(_section(layout="flux", latent_channels=16,
                                                           default_steps=4, default_guidance_scale=0.0)))
    assert (clip.size_multiple, flux.size_multiple) == (8, 16)
    assert clip.latent_shape(2, 64, 32) == (2, 4, 8, 4)
    assert flux.latent_shape(1, 64, 32) == (1, 8, 64)
    assert clip.takes_negative_prompt and not flux.takes_negative_prompt
    assert not clip.uses_t5 and flux.uses_t5
    assert clip.static_dims(64, 64, 1)["batch"] == 2 and flux.static_dims(64, 64, 1)["batch"] == 1
    assert (flux.config.default_steps, flux.config.default_guidance_scale) == (4, 0.0)
    old = PipelineConfig.from_section(_section())  # an old manifest: the old defaults
    assert (old.default_steps, old.default_guidance_scale, old.default_size, old.default_scheduler) == (50, 7.5, 64, "euler")


#: Literal family or layout names compared outside the registries (families.py, layouts/).
_LITERAL = re.compile(r"""(family|prompt_layout|layout)\s*(==|!=)\s*["']|(family|prompt_layout|layout)\s+(not\s+)?in\s+[(\[{]\s*["']"""
                      r"""|["']\s*(==|!=)\s*\S*(family|prompt_layout)\b""")


def test_no_literal_family_checks_outside_the_registries() -> None:
    # the registry, and the manifest reader that maps an old `prompt_layout` to a layout
    allowed = {ROOT / "export" / "diffusion" / "families.py", ROOT / "runtimes" / "tasks" / "pipeline_config.py"}
    offenders = []
    for top in ("enginekit", "export", "quant", "runtimes", "bench", "serve"):
        for path in (ROOT / top).rglob("*.py"):
            if path in allowed or "layouts" in path.parts:
                continue
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if _LITERAL.search(line) or "prompt_layout" in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(("spec", "layout", "steps", "guidance"), [
    ("tiny-sd15", ClipLayout, 50, 7.5), ("tiny-sdxl", ClipLayout, 50, 5.0), ("tiny-sd3", SD3Layout, 28, 7.0),
    ("tiny-flux", FluxLayout, 28, 3.5)])
def test_the_family_writes_layout_and_call_defaults_into_the_section(spec: str, layout: type, steps: int,
                                                                     guidance: float) -> None:
    pytest.importorskip("diffusers")
    from enginekit.export.diffusion.sources import resolve_pipeline

    src = resolve_pipeline(spec)
    section = F.get_family(src.family).task_config(src.pipeline)
    section["tokenizers"] = {e["tokenizer"]: {"kind": "clip", "max_length": 77} for e in section["text_encoders"]}
    config = PipelineConfig.from_section(section)
    assert type(layout_for(config)) is layout and section["layout"] == layout.name
    assert (config.default_steps, config.default_guidance_scale) == (steps, guidance)
    assert config.default_size == config.sample_size * config.vae_scale_factor == section["default_size"]
    assert section["default_scheduler"] == config.default_scheduler
    assert (section["vae_precision"] == "fp32") is (spec == "tiny-sdxl")  # SDXL's VAE stays fp32
