"""``compile -b openvino --genai``: OpenVINO GenAI's folder layout, run by the real ``openvino-genai``.

GenAI draws its noise with ``TorchGenerator(seed)`` (torch's CPU generator), so the same noise
drawn with torch and handed to enginekit as ``latents`` makes the two runs comparable. Both run the
same IRs in f32 (GenAI is told ``INFERENCE_PRECISION_HINT=f32``; its default on AMX is bf16), so the
images differ only by GenAI's uint8 output and its own scheduler arithmetic: one step is the same
computation on every family; several steps too for the UNet and SD3 (Euler / flow Euler with
the same sigmas), while GenAI's FLUX schedule places its sigmas by its own formula
(``linspace(1, sigma_min)``, not diffusers' ``linspace(1, 1/N)``), which moves a 4-step image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
genai = pytest.importorskip("openvino_genai")
pytest.importorskip("openvino_tokenizers")

import openvino as ov  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import enginekit  # noqa: E402
from enginekit.app.cli import cli  # noqa: E402
from enginekit.errors import ArtifactError, InputError  # noqa: E402
from enginekit.manifest import read_manifest  # noqa: E402
from enginekit.runtimes.openvino_genai import write_genai_layout  # noqa: E402

from ..conftest import psnr  # noqa: E402

SIZE = 64
PROMPT = "a red fox in the snow"
SEED = 7
CALLS = {
    "tiny-sd15": dict(negative_prompt="blurry", guidance_scale=5.0),
    "tiny-sdxl": dict(negative_prompt="blurry", guidance_scale=5.0),
    "tiny-sd3": dict(negative_prompt="blurry", guidance_scale=5.0, max_sequence_length=32),
    "tiny-flux": dict(guidance_scale=3.5, max_sequence_length=32),
}


@pytest.fixture(scope="module")
def layouts(tiny_pipelines: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genai")
    for name in CALLS:
        write_genai_layout(tiny_pipelines[(name, "openvino")], root / name)
    return {name: root / name for name in CALLS}


def _torch_noise(manifest: object, packed: bool, seed: int) -> np.ndarray:
    """The noise GenAI's ``TorchGenerator(seed)`` draws, in the shape enginekit takes it."""
    tc = manifest.task_config
    f = tc["vae_scale_factor"]
    noise = torch.randn((1, tc["latent_channels"], SIZE // f, SIZE // f), generator=torch.Generator().manual_seed(seed))
    if packed:  # FLUX: diffusers' _pack_latents, 2x2 patches
        b, c, h, w = noise.shape
        noise = noise.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    return noise.numpy()


def _genai_image(folder: Path, name: str, steps: int) -> np.ndarray:
    pipe = genai.Text2ImagePipeline(str(folder), "CPU", INFERENCE_PRECISION_HINT="f32")
    out = pipe.generate(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE,
                        generator=genai.TorchGenerator(SEED), **CALLS[name])
    return np.asarray(out.data)[0].astype(np.float32) / 255.0


def _enginekit_image(artifact: Path, name: str, steps: int, seed: int = SEED) -> np.ndarray:
    with enginekit.load(artifact, device="cpu") as pipe:
        latents = _torch_noise(pipe.manifest, name == "tiny-flux", seed)
        out = pipe(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE, latents=latents, output_type="np",
                   **CALLS[name])
    return np.asarray(out.images[0], dtype=np.float32)


@pytest.mark.parametrize("name", list(CALLS))
def test_genai_runs_the_layout_as_enginekit_runs_the_engine(tiny_pipelines: dict, layouts: dict, name: str) -> None:
    source = tiny_pipelines[(name, "openvino")]
    one = _genai_image(layouts[name], name, 1)
    assert one.std() > 0.02
    assert psnr(_enginekit_image(source, name, 1), one) >= 48.0  # uint8 rounding alone is ~59 dB
    several = _genai_image(layouts[name], name, 4)
    ours = _enginekit_image(source, name, 4)
    budget = 36.0 if name == "tiny-flux" else 48.0
    assert psnr(ours, several) >= budget
    # the comparison tells images apart: other noise is far below the budget
    assert psnr(_enginekit_image(source, name, 4, seed=SEED + 1), several) < budget - 10
    # the folder is an enginekit artifact too, running the very IRs GenAI ran
    assert psnr(ours, _enginekit_image(layouts[name], name, 4)) >= 60.0


def test_the_irs_follow_optimums_contract(layouts: dict, tmp_path: Path) -> None:
    core = ov.Core()
    folder = layouts["tiny-sdxl"]
    unet = core.read_model(str(folder / "unet" / "openvino_model.xml"))
    assert len(unet.outputs) == 1 and "out_sample" in unet.outputs[0].get_names()
    assert unet.input("timestep").get_element_type() == ov.Type.i64
    index = json.loads((folder / "model_index.json").read_text())
    for enc in ("text_encoder", "text_encoder_2"):
        model = core.read_model(str(folder / enc / "openvino_model.xml"))
        layers = json.loads((folder / enc / "config.json").read_text())["num_hidden_layers"]
        projected = index[enc][1] == "CLIPTextModelWithProjection"
        names = [o.get_any_name() for o in model.outputs]
        assert names[:2] == (["text_embeds", "last_hidden_state"] if projected else ["last_hidden_state", "pooler_output"])
        # GenAI reads position N + 1 and optimum-intel hidden_states[-2]: the penultimate layer, both
        assert "penultimate_hidden_state" in model.outputs[layers + 1].get_names()
        assert [n for n in names if n.startswith("hidden_states")] == [f"hidden_states.{k}" for k in range(layers + 1)]
    assert (folder / "tokenizer_2" / "openvino_tokenizer.xml").is_file()
    # transformers' files too (optimum-intel's slow CLIPTokenizer reads vocab.json and merges.txt)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in (folder / "tokenizer").iterdir()}
    assert json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"] == "CLIPTokenizer"
    assert json.loads((folder / "vae_decoder" / "config.json").read_text())["scaling_factor"] > 0
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler"  # enginekit's default, resolved
    transformer = core.read_model(str(layouts["tiny-flux"] / "transformer" / "openvino_model.xml"))
    assert {"hidden_states", "sample"} <= set(transformer.input(0).get_names())
    manifest = read_manifest(folder)
    assert manifest.target["layout"] == "openvino-genai" and manifest.provenance["parent"]["kind"] == "openvino"
    # a GenAI folder written again (from its own IRs and configs) comes out the same shape
    again = write_genai_layout(folder, tmp_path / "again")
    assert {n: [s.name for s in c.outputs] for n, c in again.components.items()} == \
        {n: [s.name for s in c.outputs] for n, c in manifest.components.items()}
    for enc in ("text_encoder", "text_encoder_2"):
        before = core.read_model(str(folder / enc / "openvino_model.xml"))
        after = core.read_model(str(tmp_path / "again" / enc / "openvino_model.xml"))
        assert [o.get_names() for o in after.outputs] == [o.get_names() for o in before.outputs]


def test_compile_genai_from_onnx_and_its_refusals(tiny_pipelines: dict, exported: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "genai"
    result = runner.invoke(cli, ["compile", str(tiny_pipelines[("tiny-sd15", "onnx")]), "-b", "openvino",
                                 "--genai", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "unet" / "openvino_model.xml").is_file() and (out / "manifest.json").is_file()
    assert not any(p.name.startswith(".genai.ov-") for p in tmp_path.iterdir())  # the scratch engine is gone
    genai.Text2ImagePipeline(str(out), "CPU")  # loads
    for args, words in (
        (["compile", str(tiny_pipelines[("tiny-sd15", "onnx")]), "-b", "onnxruntime", "--genai"],
         "takes --backend openvino"),
        (["compile", str(next(iter(exported.values()))), "-b", "openvino", "--genai"], "image-classification"),
    ):
        result = runner.invoke(cli, [*args, "-o", str(tmp_path / "refused")])
        assert result.exit_code != 0 and words in result.output and "Traceback" not in result.output
        assert not (tmp_path / "refused").exists()


def test_an_artifact_without_component_configs_is_refused_in_one_line(tiny_pipelines: dict, tmp_path: Path) -> None:
    src = tmp_path / "old"
    shutil.copytree(tiny_pipelines[("tiny-sd15", "openvino")], src)
    manifest = read_manifest(src)
    stripped = manifest.replace(assets=tuple(a for a in manifest.assets if not a.path.endswith("/config.json")))
    (src / "manifest.json").write_text(stripped.to_json())
    with pytest.raises(ArtifactError, match="export it again"):
        write_genai_layout(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="OpenVINO text-to-image"):
        write_genai_layout(tiny_pipelines[("tiny-sd15", "onnx")], tmp_path / "out")
