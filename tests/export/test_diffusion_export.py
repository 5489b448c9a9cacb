"""Diffusion pipeline sources and the per-component ONNX export of UNet pipelines (SD 1.5, SD 2.x, SDXL).

Tiny seeded twins only, each exported once per module; the full-size export is marked slow.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import pytest

from enginekit.artifact import sha256_file, verify_artifact
from enginekit.errors import FidelityError, SourceError
from enginekit.manifest import read_manifest

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline  # noqa: E402
from enginekit.export.diffusion.sources import config_dir, resolve_pipeline  # noqa: E402

from ._sd_single_file import unet_to_ldm, vae_to_ldm, write_ldm_checkpoint  # noqa: E402

TEXT_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state", "pooled")
TASK_KEYS = {
    "pipeline", "denoiser", "text_encoders", "tokenizers", "scheduler", "latent_channels", "vae_scale_factor",
    "vae_scaling_factor", "vae_shift_factor", "prediction_type", "sample_size", "force_zeros_for_empty_prompt",
    "requires_aesthetics_score", "time_cond_proj_dim", "vae_precision", "text_encoder_vocab_sizes",
}


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd15 written by diffusers' save_pretrained (safetensors)."""
    out = tmp_path_factory.mktemp("tiny-sd15-folder") / "pipe"
    resolve_pipeline("tiny-sd15").pipeline.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def sd15_artifact(tmp_path_factory: pytest.TempPathFactory, sd15_folder: Path) -> Path:
    """The tiny SD 1.5 pipeline exported from its save_pretrained folder."""
    out = tmp_path_factory.mktemp("export") / "sd15"
    steps: list[str] = []
    export_pipeline(str(sd15_folder), out, on_step=steps.append)
    (out.parent / "steps.json").write_text(json.dumps(steps))
    return out


@pytest.fixture(scope="module")
def sdxl_artifact(tiny_pipelines: dict) -> Path:
    """tiny-sdxl as the session's shared export (conftest) writes it: exported once for every test file."""
    return tiny_pipelines[("tiny-sdxl", "onnx")]


def _spec(component, name: str) -> tuple[str, tuple]:
    t = component.input(name) or component.output(name)
    assert t is not None, f"{component.name} has no {name}"
    return t.dtype, t.shape


def _check_common(root: Path, family: str, encoders: list[str]) -> dict:
    manifest = read_manifest(root)
    verify_artifact(root, manifest, full=True)
    assert (manifest.kind, manifest.task, manifest.family) == ("onnx", "text-to-image", family)
    assert set(manifest.components) == {*encoders, "unet", "vae_decoder", "vae_encoder"}
    for name, comp in manifest.components.items():
        assert comp.entry == f"{name}/model.onnx" and (root / comp.entry).is_file()
        fid = comp.fidelity
        assert fid["passed"] and fid["exporter"] in ("dynamo", "torchscript")
        assert fid["min_cosine"] >= fid["budget"]["min_cosine"]
        for out in comp.outputs:
            assert fid[f"{out.name}_max_abs"] <= fid["budget"]["max_abs"][out.name]
        # parity ran at another batch than the traced 2, so the dynamic axis was exercised
        first = next(iter(fid["inputs"].values()))["shape"][0]
        assert first != 2
        assert manifest.fidelity["components"][name]["passed"]
    for enc in encoders:
        comp = manifest.components[enc]
        assert _spec(comp, "input_ids") == ("int64", ("batch", "sequence"))
        assert [o.name for o in comp.outputs] == list(TEXT_OUTPUTS)
        assert comp.output("last_hidden_state").shape[:2] == ("batch", "sequence")
        assert comp.output("pooled").shape[0] == "batch"
    unet = manifest.components["unet"]
    assert _spec(unet, "sample") == ("float32", ("batch", 4, "latent_height", "latent_width"))
    assert _spec(unet, "timestep") == ("float32", ("batch",))
    assert _spec(unet, "encoder_hidden_states")[1][:2] == ("batch", "sequence")
    assert _spec(unet, "out_sample") == ("float32", ("batch", 4, "latent_height", "latent_width"))
    dec, enc = manifest.components["vae_decoder"], manifest.components["vae_encoder"]
    assert _spec(dec, "latent_sample") == ("float32", ("batch", 4, "latent_height", "latent_width"))
    assert _spec(dec, "sample") == ("float32", ("batch", 3, "height", "width"))
    assert _spec(enc, "sample") == ("float32", ("batch", 3, "height", "width"))
    assert _spec(enc, "latent_parameters") == ("float32", ("batch", 8, "latent_height", "latent_width"))
    # The ONNX graphs carry the same names as the manifest.
    import onnx

    for comp in manifest.components.values():
        graph = onnx.load(str(root / comp.entry), load_external_data=False).graph
        for value, spec in zip([*graph.input, *graph.output], [*comp.inputs, *comp.outputs]):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert (value.name, tuple(dims)) == (spec.name, spec.shape)
    # Assets: present, hashed, and what task_config points at.
    tc = manifest.task_config
    assert TASK_KEYS <= set(tc)
    paths = {a.path for a in manifest.assets}
    assert {"scheduler/scheduler_config.json", "model_index.json"} <= paths
    # each model component's own config.json (what GenAI's and optimum's folder layouts carry)
    configs = {"vae", tc["denoiser"], *(e["component"] for e in tc["text_encoders"])}
    assert {f"{c}/config.json" for c in configs} <= paths
    assert json.loads((root / "vae/config.json").read_text())["scaling_factor"] == tc["vae_scaling_factor"]
    for entry in manifest.assets:
        assert sha256_file(root / entry.path) == entry.sha256
    for enc_cfg in tc["text_encoders"]:
        tok = tc["tokenizers"][enc_cfg["tokenizer"]]
        assert tok["file"] == f"{enc_cfg['tokenizer']}/tokenizer.json" and tok["file"] in paths
        assert tok["vocab_size"] == 49408 == tc["text_encoder_vocab_sizes"][enc_cfg["component"]]
    saved = json.loads((root / "scheduler/scheduler_config.json").read_text())
    assert tc["scheduler"]["_class_name"] == saved["_class_name"]
    assert tc["denoiser"] == "unet" and tc["latent_channels"] == 4 and tc["vae_scale_factor"] == 8
    assert tc["vae_shift_factor"] is None and tc["time_cond_proj_dim"] is None
    prov = manifest.provenance
    assert prov["family"] == family and prov["peak_rss_bytes"] > 0
    assert set(prov["exporters"]) == set(manifest.components)
    assert {"torch", "onnx", "diffusers", "opset"} <= set(prov["tools"])
    return tc


def test_tiny_sd15_export_from_a_save_pretrained_folder(sd15_artifact: Path, sd15_folder: Path) -> None:
    tc = _check_common(sd15_artifact, "sd15", ["text_encoder"])
    manifest = read_manifest(sd15_artifact)
    assert tc["pipeline"] == "StableDiffusionPipeline"
    assert tc["text_encoders"] == [{"component": "text_encoder", "tokenizer": "tokenizer",
                                    "hidden_state": "last", "use_pooled": False}]
    assert tc["tokenizers"]["tokenizer"]["pad_token"] == "<|endoftext|>"
    assert tc["prediction_type"] == "epsilon" and tc["vae_scaling_factor"] == pytest.approx(0.18215)
    assert tc["vae_precision"] == "any" and tc["force_zeros_for_empty_prompt"] is False
    assert tc["scheduler"]["_class_name"] == "PNDMScheduler"
    unet = manifest.components["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.input("encoder_hidden_states").shape == ("batch", "sequence", 32)
    prov = manifest.provenance
    assert prov["kind"] == "folder" and prov["source"] == str(sd15_folder.resolve())
    assert prov["family_from"].startswith("text encoder")  # a tiny width: told by its CLIP flavour
    assert "unet/diffusion_pytorch_model.safetensors" in prov["weights_sha256"]
    steps = json.loads((sd15_artifact.parent / "steps.json").read_text())
    assert any("unet" in s for s in steps) and any("vae_encoder" in s for s in steps)


def test_tiny_sdxl_export(sdxl_artifact: Path) -> None:
    tc = _check_common(sdxl_artifact, "sdxl", ["text_encoder", "text_encoder_2"])
    manifest = read_manifest(sdxl_artifact)
    assert tc["pipeline"] == "StableDiffusionXLPipeline"
    assert tc["text_encoders"] == [
        {"component": "text_encoder", "tokenizer": "tokenizer", "hidden_state": "penultimate", "use_pooled": False},
        {"component": "text_encoder_2", "tokenizer": "tokenizer_2", "hidden_state": "penultimate", "use_pooled": True},
    ]
    assert tc["tokenizers"]["tokenizer_2"]["pad_token"] == "!"
    assert tc["vae_precision"] == "fp32" and tc["force_zeros_for_empty_prompt"] is True
    assert tc["vae_scaling_factor"] == pytest.approx(0.13025)
    unet = manifest.components["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    # cross attention over both encoders' features, concatenated; pooled from the second
    h1 = manifest.components["text_encoder"].output("last_hidden_state").shape[2]
    h2 = manifest.components["text_encoder_2"].output("last_hidden_state").shape[2]
    assert unet.input("encoder_hidden_states").shape[2] == h1 + h2
    assert unet.input("text_embeds").shape == ("batch", manifest.components["text_encoder_2"].output("pooled").shape[1])
    assert unet.input("time_ids").shape == ("batch", 6)
    assert manifest.provenance["kind"] == "builtin" and manifest.provenance["seed"] == 0


def test_exported_unet_runs_at_another_size(sdxl_artifact: Path) -> None:
    """The symbolic axes are real: the engine runs at a batch and latent size never traced."""
    from enginekit.runtimes.onnxruntime import run_onnx_file

    manifest = read_manifest(sdxl_artifact)
    unet = manifest.components["unet"]
    rng = np.random.default_rng(0)
    dims = {"batch": 1, "latent_height": 10, "latent_width": 14, "sequence": 77}
    feeds = {t.name: rng.standard_normal([dims.get(d, d) for d in t.shape]).astype(np.float32) for t in unet.inputs}
    out = run_onnx_file(sdxl_artifact / unet.entry, feeds)["out_sample"]
    assert out.shape == (1, 4, 10, 14) and np.isfinite(out).all()


# --------------------------------------------------------------------------- sources


def test_folder_family_detection_and_validation(sd15_folder: Path) -> None:
    src = resolve_pipeline(str(sd15_folder))
    assert src.family == "sd15" and type(src.pipeline).__name__ == "StableDiffusionPipeline"
    # the folder cannot tell sd15 from sd21 by width here, so --family decides
    assert resolve_pipeline(str(sd15_folder), family="sd21").family == "sd21"
    with pytest.raises(SourceError, match="not sdxl"):
        resolve_pipeline(str(sd15_folder), family="sdxl")


def test_folder_with_only_pickled_weights_is_refused(tmp_path: Path, sd15_folder: Path) -> None:
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(sd15_folder, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_suffix(".bin"))
    with pytest.raises(SourceError, match="only pickled weights.*never unpickles") as err:
        resolve_pipeline(str(folder))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("builtin,family", [("tiny-sd15", "sd15"), ("tiny-sdxl", "sdxl")])
def test_single_file_checkpoint_round_trips(tmp_path: Path, builtin: str, family: str) -> None:
    import torch

    ref = resolve_pipeline(builtin).pipeline
    path = write_ldm_checkpoint(ref, family, tmp_path / f"{builtin}.safetensors")
    src = resolve_pipeline(str(path), family=family, config=config_dir(builtin))
    assert src.family == family and src.provenance["kind"] == "single_file"
    assert src.provenance["weights_sha256"] == sha256_file(path)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(ref, name, None) is None:
            continue
        want, got = getattr(ref, name).state_dict(), getattr(src.pipeline, name).state_dict()
        assert set(want) == set(got), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert src.pipeline.tokenizer.pad_token == "<|endoftext|>"


def test_single_file_errors(tmp_path: Path) -> None:
    ref = resolve_pipeline("tiny-sd15").pipeline
    path = write_ldm_checkpoint(ref, "sd15", tmp_path / "tiny.safetensors")
    cases = [
        (dict(), "needs --family"),
        (dict(family="sdxl"), "keys are those of a sd15 checkpoint, not sdxl"),
        (dict(family="sd15"), "does not fit the sd15 architecture"),  # the full-size config: wrong shapes
    ]
    for kwargs, message in cases:
        with pytest.raises(SourceError, match=message) as err:
            resolve_pipeline(str(path), **kwargs)
        assert "\n" not in str(err.value)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 8 + b"{not json" + b"\x00" * 64)
    with pytest.raises(SourceError, match="not a readable safetensors checkpoint") as err:
        resolve_pipeline(str(corrupt), family="sd15")
    assert "\n" not in str(err.value)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"PK")
    with pytest.raises(SourceError, match="never loaded"):
        resolve_pipeline(str(pickled), family="sd15")


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_repo_configs_fit_the_original_checkpoint_layout(family: str) -> None:
    """The published architectures, built on the meta device and written in LDM names, pass the
    single-file fit check against the repository's configs (no weights are made)."""
    import torch

    from enginekit.export.diffusion import sources
    from ._sd_single_file import open_clip_to_ldm, openai_clip_to_ldm

    folder = config_dir(family)
    import diffusers
    import transformers

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(diffusers.UNet2DConditionModel.load_config(str(folder / "unet")))
        vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(str(folder / "vae")))
        te = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
        header = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
        if family == "sd15":
            header.update(openai_clip_to_ldm(te.state_dict(), "cond_stage_model.transformer."))
        elif family == "sd21":
            header.update(open_clip_to_ldm(te.state_dict(), "cond_stage_model.model."))
        else:
            te2 = transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2")))
            header.update(openai_clip_to_ldm(te.state_dict(), "conditioner.embedders.0.transformer."))
            header.update(open_clip_to_ldm(te2.state_dict(), "conditioner.embedders.1.model."))
    sources._check_fit(Path(f"{family}.safetensors"), header, family, folder)
    other = {"sd15": "sd21", "sd21": "sd15", "sdxl": "sd15"}[family]
    with pytest.raises(SourceError):
        sources._check_fit(Path(f"{family}.safetensors"), header, other, config_dir(other))


def test_repo_configs_are_the_published_architectures() -> None:
    cfg = {f: json.loads((config_dir(f) / "unet" / "config.json").read_text()) for f in ("sd15", "sd21", "sdxl")}
    assert cfg["sd15"]["cross_attention_dim"] == 768 and cfg["sd21"]["cross_attention_dim"] == 1024
    assert cfg["sdxl"]["addition_embed_type"] == "text_time" and cfg["sdxl"]["cross_attention_dim"] == 2048
    sched = json.loads((config_dir("sd21") / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    te2 = json.loads((config_dir("sdxl") / "text_encoder_2" / "config.json").read_text())
    assert te2["architectures"] == ["CLIPTextModelWithProjection"] and te2["hidden_size"] == 1280


def test_architecture_names_need_random_weights() -> None:
    for family in ("sd15", "sd21", "sdxl"):
        with pytest.raises(SourceError, match="--random-weights"):
            resolve_pipeline(family)


def test_unknown_specs_and_families() -> None:
    with pytest.raises(SourceError, match="is not a pipeline source"):
        resolve_pipeline("no-such-thing")
    with pytest.raises(SourceError, match="unknown family"):
        resolve_pipeline("tiny-sd15", family="sd9")
    with pytest.raises(SourceError, match="is a sd15 pipeline, not sdxl"):
        resolve_pipeline("tiny-sd15", family="sdxl")
    with pytest.raises(SourceError, match="--random-weights applies to"):
        resolve_pipeline("tiny-sd15-folder-that-does-not-exist", random_weights=True)


def test_offline_hub_id_not_in_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE") as err:
        resolve_pipeline("enginekit-tests/no-such-pipeline")
    assert "\n" not in str(err.value)


def test_builtins_are_seeded() -> None:
    import torch

    a, b = resolve_pipeline("tiny-sd15"), resolve_pipeline("tiny-sd15", seed=1)
    again = resolve_pipeline("tiny-sd15")
    wa, wb, w2 = (s.pipeline.unet.conv_in.weight for s in (a, b, again))
    assert torch.equal(wa, w2) and not torch.equal(wa, wb)
    assert a.pipeline.text_encoder.config.vocab_size == 49408


# --------------------------------------------------------------------------- failures


def test_parity_miss_raises_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    impossible = PipelineExportOptions(atol=0.0, rtol=0.0, min_cosine=1.5)
    with pytest.raises(FidelityError, match=r"text_encoder misses its parity budget: .*max abs .*budget") as err:
        export_pipeline("tiny-sd15", out, impossible)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.slow  # a memory-order check (52 s on 2 cores): runs with -m slow
def test_without_the_image_check_weights_are_dropped_before_onnx_runtime_loads_the_graph(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """So a 10 GB transformer is never in memory twice (PyTorch's and ONNX Runtime's copies)."""
    from enginekit.export.diffusion import sd

    held: dict[str, object] = {}
    real_resolve, real_run = sd.resolve_pipeline, sd.run_onnx_file

    def resolve(*args, **kwargs):
        held["src"] = real_resolve(*args, **kwargs)
        return held["src"]

    still_loaded: dict[str, bool] = {}

    def run(path, feeds):
        name = Path(path).parent.name
        still_loaded[name] = getattr(held["src"].pipeline, name, None) is not None
        return real_run(path, feeds)

    monkeypatch.setattr(sd, "resolve_pipeline", resolve)
    monkeypatch.setattr(sd, "run_onnx_file", run)
    export_pipeline("tiny-sd3", tmp_path / "a", PipelineExportOptions(image_check=False))
    assert {k: v for k, v in still_loaded.items() if k in ("text_encoder", "text_encoder_2", "text_encoder_3",
                                                           "transformer")} == dict.fromkeys(
        ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer"), False)
    assert "vae_decoder" in still_loaded


# --------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_sd15_random_weights_fits_in_24_gb(tmp_path: Path) -> None:
    started = time.monotonic()
    manifest = export_pipeline("sd15", tmp_path / "sd15", random_weights=True)
    peak = manifest.provenance["peak_rss_bytes"]
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"full-size sd15: peak RSS {peak / 2**30:.1f} GiB (process max {lifetime / 2**30:.1f} GiB), "
          f"{time.monotonic() - started:.0f} s")
    assert peak < 24 * 2**30
    unet = manifest.components["unet"]
    assert {f.path for f in unet.files} == {"unet/model.onnx", "unet/model.onnx.data"}
    assert unet.input("encoder_hidden_states").shape == ("batch", "sequence", 768)
    assert manifest.task_config["sample_size"] == 64


def test_lcm_unet_takes_timestep_cond() -> None:
    """A UNet with time_cond_proj_dim (LCM) gets a ``timestep_cond`` input (the plan only: no export)."""
    import diffusers

    from enginekit.export.diffusion.sd import _plans

    src = resolve_pipeline("tiny-sd15")
    cfg = {k: v for k, v in src.pipeline.unet.config.items() if not k.startswith("_")}
    cfg["time_cond_proj_dim"] = 16
    src.pipeline.unet = diffusers.UNet2DConditionModel.from_config(cfg).eval()
    plan = _plans(src.pipeline, "sd15", PipelineExportOptions())[1]()
    assert plan.name == "unet"
    assert [t.name for t in plan.inputs] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert plan.inputs[-1].shape == ("batch", 16)
    out, deep = plan.module(*plan.parity)  # out_sample, and DeepCache's reused feature
    assert [t.name for t in plan.outputs] == ["out_sample", "deep_cache"]
    assert tuple(out.shape) == tuple(plan.parity[0].shape)
    assert deep.shape[0] == out.shape[0] and tuple(deep.shape[2:]) == tuple(out.shape[2:])
