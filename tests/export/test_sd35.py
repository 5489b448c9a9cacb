"""SD3.5 (MMDiT-X: dual-attention layers, rms_norm q/k norms) and FLUX.1 dev vs schnell.

The tiny SD3.5 twin exports with its parity checks and its images match diffusers'
StableDiffusion3Pipeline; a tiny schnell (no guidance embedding, fixed-shift schedule)
and a tiny dev differ where the published models differ; the full-size configs build
the published architectures (counted on the meta device: no weights are made)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

import enginekit  # noqa: E402

from ..conftest import backend_params, installed_backends, psnr  # noqa: E402

SIZE = 64
PROMPTS = ["a lighthouse at dusk", "a red bicycle leaning on a wall"]
NEGATIVES = ["blurry", "low quality"]


@pytest.fixture(scope="module")
def sd35(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny-sd35 exported (parity + image check) and compiled for every installed backend."""
    from enginekit.api import compile_artifact
    from enginekit.export.diffusion.sd import export_pipeline

    root = tmp_path_factory.mktemp("sd35")
    out = {"onnx": root / "onnx"}
    export_pipeline("tiny-sd35", out["onnx"])
    for backend in installed_backends():
        out[backend] = root / backend
        compile_artifact(out["onnx"], backend, out[backend])
    return out


def test_tiny_sd35_has_the_mmdit_x_blocks() -> None:
    from enginekit.export.diffusion.sources import resolve_pipeline

    tr = resolve_pipeline("tiny-sd35").pipeline.transformer
    assert tr.config.qk_norm == "rms_norm" and list(tr.config.dual_attention_layers) == [0]
    first, second = tr.transformer_blocks[0], tr.transformer_blocks[1]
    assert first.use_dual_attention and first.attn2 is not None and not second.use_dual_attention
    assert type(first.attn.norm_q).__name__ == "RMSNorm" and type(first.attn.norm_added_q).__name__ == "RMSNorm"


def test_tiny_sd35_exports_with_parity(sd35: dict[str, Path]) -> None:
    from enginekit.manifest import read_manifest

    manifest = read_manifest(sd35["onnx"])
    assert manifest.family == "sd3" and manifest.provenance["source"] == "tiny-sd35"
    tr = manifest.fidelity["components"]["transformer"]
    assert tr["passed"] and tr["min_cosine"] >= 0.9999
    assert manifest.fidelity["image"]["psnr_db"] >= 40.0


@pytest.mark.parametrize("kind", backend_params("onnx"))
def test_tiny_sd35_images_match_diffusers(sd35: dict[str, Path], kind: str) -> None:
    from enginekit.export.diffusion.sources import resolve_pipeline

    pipe = enginekit.load(sd35[kind], device="cpu")
    latents = np.random.default_rng(0).standard_normal((2, 16, SIZE // 8, SIZE // 8), dtype=np.float32)
    got = pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=5.0, height=SIZE,
               width=SIZE, latents=latents, output_type="np").images
    ref_pipe = resolve_pipeline("tiny-sd35").pipeline
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        ref = ref_pipe(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=5.0, height=SIZE,
                       width=SIZE, latents=torch.from_numpy(latents), output_type="np").images
    assert ref.std() > 0.02
    assert psnr(ref, got) >= 40.0, f"{kind}: {psnr(ref, got):.1f} dB"


# --------------------------------------------------------------------------- FLUX dev vs schnell


def _schnell_folder(root: Path) -> Path:
    """tiny-flux's configs with schnell's differences: no guidance embedding, fixed shift 1.0."""
    from enginekit.export.diffusion.sources import config_dir

    folder = root / "tiny-flux-schnell"
    shutil.copytree(config_dir("tiny-flux"), folder)
    tr = json.loads((folder / "transformer" / "config.json").read_text())
    tr["guidance_embeds"] = False
    (folder / "transformer" / "config.json").write_text(json.dumps(tr))
    sched = json.loads((config_dir("flux-schnell") / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    return folder


@pytest.fixture(scope="module")
def flux_pair(tmp_path_factory: pytest.TempPathFactory, tiny_pipelines: dict) -> dict[str, tuple[Path, object]]:
    """tiny-flux (a dev: guidance embedded) as the session exported it, and a schnell twin exported here."""
    from enginekit.export.diffusion.sd import export_pipeline
    from enginekit.export.diffusion.sources import _build_seeded, resolve_pipeline

    root = tmp_path_factory.mktemp("flux")
    schnell = _build_seeded(_schnell_folder(root), "flux", 0)
    export_pipeline(schnell, root / "schnell")
    return {"dev": (tiny_pipelines[("tiny-flux", "onnx")], resolve_pipeline("tiny-flux").pipeline),
            "schnell": (root / "schnell", schnell.pipeline)}


def test_schnell_has_no_guidance_input_and_dev_has_one(flux_pair: dict) -> None:
    from enginekit.manifest import read_manifest

    dev, schnell = (read_manifest(flux_pair[k][0]) for k in ("dev", "schnell"))
    assert [s.name for s in dev.components["transformer"].inputs][-1] == "guidance"
    assert "guidance" not in [s.name for s in schnell.components["transformer"].inputs]
    assert dev.task_config["guidance_embeds"] is True and schnell.task_config["guidance_embeds"] is False
    assert dev.task_config["max_sequence_length"] == 512 and schnell.task_config["max_sequence_length"] == 256
    assert dev.task_config["tokenizers"]["tokenizer_2"]["max_length"] == 512
    assert schnell.task_config["tokenizers"]["tokenizer_2"]["max_length"] == 256
    assert (schnell.task_config["default_steps"], schnell.task_config["default_guidance_scale"]) == (4, 0.0)
    assert (dev.task_config["default_steps"], dev.task_config["default_guidance_scale"]) == (28, 3.5)
    assert schnell.fidelity["image"]["psnr_db"] >= 40.0


def test_schnell_defaults_match_diffusers_at_4_steps_guidance_0(flux_pair: dict) -> None:
    from enginekit.runtimes.tasks.text_to_image import pack_latents

    art, ref_pipe = flux_pair["schnell"]
    pipe = enginekit.load(art, device="cpu")
    latents = pack_latents(np.random.default_rng(3).standard_normal((2, 16, 8, 8), dtype=np.float32))
    out = pipe(PROMPTS, latents=latents, output_type="np")  # the model's defaults: 4 steps, 256 T5 tokens
    assert len(out.timesteps) == 4
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        ref = ref_pipe(PROMPTS, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256, height=SIZE,
                       width=SIZE, latents=torch.from_numpy(latents), output_type="np").images
    assert ref.std() > 0.02
    assert psnr(ref, out.images) >= 40.0
    # the schedule is schnell's fixed shift 1.0: sigmas fall linearly from 1, no resolution-dependent mu
    np.testing.assert_allclose(np.asarray(out.timesteps) / 1000, np.linspace(1.0, 0.25, 4), rtol=1e-6)


def test_dev_guidance_changes_the_image_and_schnell_ignores_it(flux_pair: dict) -> None:
    from enginekit.runtimes.tasks.text_to_image import pack_latents

    latents = pack_latents(np.random.default_rng(4).standard_normal((1, 16, 8, 8), dtype=np.float32))
    for name, differs in (("dev", True), ("schnell", False)):
        pipe = enginekit.load(flux_pair[name][0], device="cpu")
        a, b = (pipe("a cat", num_inference_steps=2, guidance_scale=g, latents=latents, output_type="np").images
                for g in (1.0, 6.0))
        assert bool(np.abs(a - b).max() > 1e-3) is differs, name


# --------------------------------------------------------------------------- full-size configs


@pytest.mark.parametrize(("name", "low", "high"), [
    ("sd35-medium", 2.2e9, 2.6e9),   # "2.5 billion parameters" (Stability AI's model card)
    ("sd35-large", 7.8e9, 8.4e9),    # "8.1 billion"
    ("flux-dev", 11.7e9, 12.1e9),    # "12 billion"
    ("flux-schnell", 11.7e9, 12.1e9),
])
def test_full_size_configs_build_the_published_transformers(name: str, low: float, high: float) -> None:
    import diffusers

    from enginekit.export.diffusion.sources import ARCHITECTURES, config_dir

    folder = config_dir(name)
    assert ARCHITECTURES[name] == ("flux" if name.startswith("flux") else "sd3")
    cls_name = json.loads((folder / "model_index.json").read_text())["transformer"][1]
    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(str(folder / "transformer")))
    n = sum(p.numel() for p in model.parameters())
    assert low <= n <= high, f"{name}: {n / 1e9:.2f}B parameters"
    if name == "sd35-medium":
        assert sum(b.use_dual_attention for b in model.transformer_blocks) == 13
    if name.startswith("flux"):
        assert (model.time_text_embed.__class__.__name__ == "CombinedTimestepGuidanceTextProjEmbeddings") is (
            name == "flux-dev")


def test_full_size_names_need_random_weights() -> None:
    from enginekit.errors import SourceError
    from enginekit.export.diffusion.sources import resolve_pipeline

    for name in ("sd35-medium", "sd35-large", "flux-dev", "flux-schnell"):
        with pytest.raises(SourceError, match="--random-weights"):
            resolve_pipeline(name)
