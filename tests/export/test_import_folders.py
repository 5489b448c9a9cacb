"""``enginekit import``: folders optimum writes (OpenVINO and ONNX) become artifacts that run as they are.

The folders are made without optimum: enginekit's own GenAI writer (``compile --genai``) writes the
very layout optimum-cli writes, and :func:`_as_optimum` then takes away what is enginekit's in it
(the manifest, the extra tensor names ``pooled``/``penultimate_hidden_state``/``sample``, the
fast tokenizer files optimum-intel's slow CLIPTokenizer does not save, a batch-wide timestep), so
each import meets optimum's interface. The imported pipeline must draw the image of the
enginekit artifact the folder came from, from the same latents. Where the peers' environment
(optimum-intel) is installed, a folder optimum-intel itself exported is imported as well.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("openvino_tokenizers")
pytest.importorskip("transformers")

import openvino as ov  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import enginekit  # noqa: E402
from enginekit.api import compile_artifact  # noqa: E402
from enginekit.app.cli import cli  # noqa: E402
from enginekit.engine import Runner  # noqa: E402
from enginekit.errors import ArtifactError, IntegrityError, ManifestError, ShapeError, SourceError  # noqa: E402
from enginekit.interface import with_interface  # noqa: E402
from enginekit.export.importer import import_folder  # noqa: E402
from enginekit.manifest import Component, TensorSpec, read_manifest  # noqa: E402
from enginekit.runtimes.openvino_genai import write_genai_layout  # noqa: E402

from ..conftest import make_photo, psnr  # noqa: E402

SIZE = 64
PROMPT = "a red fox in the snow"
CALLS = {
    "tiny-sd15": dict(negative_prompt="blurry", guidance_scale=5.0),
    "tiny-sdxl": dict(negative_prompt="blurry", guidance_scale=5.0),
    "tiny-flux": dict(guidance_scale=3.5, max_sequence_length=32),
}
PEERS = Path("/work/peers-venv/bin/python")


def _save(model: ov.Model, xml: Path) -> None:
    """Save over the IR ``model`` was read from (written aside first: the old .bin is mapped)."""
    tmp = xml.with_name("rewritten.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    os.replace(tmp, xml)
    os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))


def _as_optimum(folder: Path, drop_fast_tokenizers: tuple[str, ...]) -> None:
    """Make a GenAI folder enginekit wrote into what optimum-intel writes (see the module docstring)."""
    import openvino.opset13 as ops

    (folder / "manifest.json").unlink()
    core = ov.Core()
    for xml in sorted(folder.glob("text_encoder*/openvino_model.xml")):
        model = core.read_model(str(xml))
        keep = []
        for port in model.outputs:
            if "pooled" in port.get_names():
                continue
            value = port.get_node().input_value(0)
            value.get_tensor().set_names(value.get_names() - {"penultimate_hidden_state"})
            keep.append(value)
        _save(ov.Model([ops.result(v) for v in keep], model.get_parameters(), "text_encoder"), xml)
    for xml in folder.glob("transformer/openvino_model.xml"):
        model = core.read_model(str(xml))
        model.input("sample").get_tensor().set_names({"hidden_states"})
        _save(model, xml)
    for xml in folder.glob("unet/openvino_model.xml"):
        model = core.read_model(str(xml))
        model.reshape({"timestep": ov.PartialShape([1])})  # one timestep for the batch, as optimum traces it
        _save(model, xml)
    for name in drop_fast_tokenizers:
        (folder / name / "tokenizer.json").unlink()


@pytest.fixture(scope="module")
def optimum_folders(tiny_pipelines: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("optimum")
    drop = {"tiny-sd15": ("tokenizer",), "tiny-sdxl": ("tokenizer_2",), "tiny-flux": ()}
    for name in CALLS:
        write_genai_layout(tiny_pipelines[(name, "openvino")], root / name)
        _as_optimum(root / name, drop[name])
    return {name: root / name for name in CALLS}


def _image(artifact: Path, name: str, steps: int = 2) -> np.ndarray:
    with enginekit.load(artifact, device="cpu") as pipe:
        shape = pipe.layout.latent_shape(1, SIZE, SIZE)
        latents = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
        out = pipe(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE, latents=latents, output_type="np",
                   **CALLS[name])
    return np.asarray(out.images[0], dtype=np.float32)


@pytest.mark.parametrize("name", list(CALLS))
def test_an_optimum_folder_imports_and_draws_the_engines_image(tiny_pipelines: dict, optimum_folders: dict,
                                                               tmp_path: Path, name: str) -> None:
    folder = optimum_folders[name]
    with pytest.raises(ManifestError, match="enginekit import"):  # a raw folder: never run unhashed
        enginekit.load(folder)
    manifest = import_folder(folder, tmp_path / "imported")
    assert manifest.family == read_manifest(tiny_pipelines[(name, "openvino")]).family
    assert not (folder / "manifest.json").exists()  # the copy's, not the folder's
    reference = _image(tiny_pipelines[(name, "openvino")], name)
    assert reference.std() > 0.02
    assert psnr(reference, _image(tmp_path / "imported", name)) >= 60.0
    # the vendor's engines are the copy's, byte for byte: the manifest maps optimum's names
    comps = manifest.components
    xml = "text_encoder/openvino_model.xml"
    assert (tmp_path / "imported" / xml).read_bytes() == (folder / xml).read_bytes()
    assert comps["text_encoder"].interface["outputs"]["pooled"] in ("pooler_output", "text_embeds")
    if name == "tiny-sdxl":
        layers = json.loads((folder / "text_encoder_2" / "config.json").read_text())["num_hidden_layers"]
        assert comps["text_encoder_2"].interface["outputs"] == {
            "pooled": "text_embeds", "penultimate_hidden_state": f"hidden_states.{layers - 1}"}
        assert comps["unet"].interface == {"one_row": ["timestep"]}
        assert manifest.task_config["tokenizers"]["tokenizer_2"]["file"] == "enginekit/tokenizer_2/tokenizer.json"
        # free dimensions named as enginekit's export names them: static shapes compile from them
        assert comps["unet"].input("sample").shape == ("batch", 4, "latent_height", "latent_width")
        result = CliRunner().invoke(cli, ["compile", str(tmp_path / "imported"), "-b", "openvino", "--height",
                                          str(SIZE), "--width", str(SIZE), "-o", str(tmp_path / "static")])
        assert result.exit_code == 0, result.output
        assert psnr(reference, _image(tmp_path / "static", name)) >= 50.0
    if name == "tiny-flux":
        assert comps["transformer"].interface == {"inputs": {"sample": "hidden_states"}}
        assert comps["transformer"].input("hidden_states").shape[:2] == ("batch", "image_sequence")


def test_an_optimum_onnx_folder_imports_too(tiny_pipelines: dict, tmp_path: Path) -> None:
    import onnx

    source = tiny_pipelines[("tiny-sd15", "onnx")]
    folder = tmp_path / "onnx-optimum"
    shutil.copytree(source, folder)
    (folder / "manifest.json").unlink()
    for half in ("vae_decoder", "vae_encoder"):  # optimum's ONNX export keeps the VAE's config per half
        shutil.copy(folder / "vae" / "config.json", folder / half / "config.json")
    shutil.rmtree(folder / "vae")
    # The scheduler as the export held it: diffusers' save_config forgets which values were defaults
    # (PNDM's timestep_spacing, which Euler then takes as its own), the exported manifest does not.
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(read_manifest(source).task_config["scheduler"]))
    path = folder / "text_encoder" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:  # optimum's CLIPTextModel outputs: last_hidden_state, pooler_output
        node.output[:] = ["pooler_output" if o == "pooled" else o for o in node.output]
    kept = [o for o in model.graph.output if o.name not in ("pooled", "penultimate_hidden_state")]
    pooled = next(o for o in model.graph.output if o.name == "pooled")
    pooled.name = "pooler_output"
    del model.graph.output[:]
    model.graph.output.extend([*kept, pooled])
    onnx.save(model, str(path))
    manifest = import_folder(folder, tmp_path / "imported")
    assert manifest.kind == "onnx" and manifest.components["text_encoder"].interface == {
        "outputs": {"pooled": "pooler_output"}}
    reference = _image(source, "tiny-sd15")
    assert psnr(reference, _image(tmp_path / "imported", "tiny-sd15")) >= 60.0
    # compiled for OpenVINO, the engines keep optimum's names, and the manifest its interface
    compiled = compile_artifact(tmp_path / "imported", "openvino", tmp_path / "ov")
    assert compiled.components["text_encoder"].interface == manifest.components["text_encoder"].interface
    assert psnr(reference, _image(tmp_path / "ov", "tiny-sd15")) >= 40.0


@pytest.fixture(scope="module")
def classifier_folder(exported: dict, tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """optimum-intel's classifier layout from enginekit's exported ONNX: the IR (logits only, as
    optimum exports it) beside the model's config.json and preprocessor_config.json."""
    import openvino.opset13 as ops

    folder = tmp_path_factory.mktemp("vit-optimum")
    model = ov.convert_model(str(exported["hf"] / "model.onnx"))
    logits = model.output("logits").get_node().input_value(0)
    ov.save_model(ov.Model([ops.result(logits)], model.get_parameters(), "vit"), str(folder / "openvino_model.xml"),
                  compress_to_fp16=False)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(tiny_hf_dir / name, folder / name)
    return folder


def test_an_optimum_classifier_predicts_as_the_export(exported: dict, classifier_folder: Path, tmp_path: Path) -> None:
    manifest = import_folder(classifier_folder, tmp_path / "vit")
    assert (manifest.task, manifest.kind, manifest.family) == ("image-classification", "openvino", "vit")
    photos = [make_photo((48, 40), seed) for seed in range(6)]
    with enginekit.load(exported["hf"], device="cpu") as ours, enginekit.load(tmp_path / "vit", device="cpu") as theirs:
        assert theirs.labels == ours.labels
        np.testing.assert_allclose(theirs.logits(photos), ours.logits(photos), atol=1e-4)
        assert [p.label for p in theirs.predict(photos)] == [p.label for p in ours.predict(photos)]
        with pytest.raises(enginekit.errors.InputError, match="logits only"):
            theirs.embed(photos[:1])
    # optimum's ONNX classifier layout: model.onnx beside the same configs
    onnx_folder = tmp_path / "vit-onnx"
    onnx_folder.mkdir()
    shutil.copy(exported["hf"] / "model.onnx", onnx_folder / "model.onnx")
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(classifier_folder / name, onnx_folder / name)
    assert import_folder(onnx_folder, tmp_path / "vit-onnx-imported").kind == "onnx"
    with enginekit.load(exported["hf"], device="cpu") as ours, \
            enginekit.load(tmp_path / "vit-onnx-imported", device="cpu") as onnx_clf:
        np.testing.assert_allclose(onnx_clf.logits(photos), ours.logits(photos), atol=1e-5)
        assert onnx_clf.embed(photos[:2]).shape == ours.embed(photos[:2]).shape  # this graph kept its embedding


def _copy(folder: Path, tmp_path: Path, name: str = "src") -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def test_bad_folders_are_refused_in_one_line_and_nothing_is_written(optimum_folders: dict, classifier_folder: Path,
                                                                   tmp_path: Path) -> None:
    cases = []
    empty = tmp_path / "empty"
    (empty / "weights").mkdir(parents=True)
    cases.append((empty, SourceError, "no model_index.json or config.json"))
    missing = _copy(optimum_folders["tiny-sdxl"], tmp_path, "missing")
    (missing / "text_encoder_2" / "openvino_model.xml").unlink()
    cases.append((missing, SourceError, "needs text_encoder_2/openvino_model.xml"))
    unknown = _copy(optimum_folders["tiny-sd15"], tmp_path, "unknown")
    index = json.loads((unknown / "model_index.json").read_text())
    (unknown / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    cases.append((unknown, SourceError, "names the pipeline 'KandinskyPipeline'; enginekit imports"))
    truncated = _copy(optimum_folders["tiny-sd15"], tmp_path, "truncated")
    weights = truncated / "unet" / "openvino_model.bin"
    os.truncate(weights, weights.stat().st_size // 2)
    cases.append((truncated, IntegrityError, "unet/openvino_model.xml does not read as an OpenVINO IR"))
    text = _copy(classifier_folder, tmp_path, "text")
    config = json.loads((text / "config.json").read_text())
    (text / "config.json").write_text(json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    cases.append((text, SourceError, "BertForSequenceClassification"))
    runner = CliRunner()
    for folder, error, words in cases:
        before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
            import_folder(folder, tmp_path / "out")
        with pytest.raises(error):
            import_folder(folder, adopt=True)
        result = runner.invoke(cli, ["import", str(folder), "-o", str(tmp_path / "out")])
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]  # beside progress lines
        assert result.exit_code == 1 and len(errors) == 1 and words.split(";")[0] in errors[0], result.output
        assert "Traceback" not in result.output, result.output
        assert not (tmp_path / "out").exists()
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary left


def test_the_cli_imports_with_o_and_adopts_in_place(optimum_folders: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    folder = _copy(optimum_folders["tiny-sd15"], tmp_path)
    result = runner.invoke(cli, ["import", str(folder), "-o", str(tmp_path / "copy"), "--copy"])
    assert result.exit_code == 0, result.output
    assert "sd15 text-to-image" in result.output and "sha256:" in result.output
    assert not (tmp_path / "copy" / "unet" / "openvino_model.bin").samefile(folder / "unet" / "openvino_model.bin")
    linked = import_folder(folder, tmp_path / "linked")
    assert (tmp_path / "linked" / "unet" / "openvino_model.bin").samefile(folder / "unet" / "openvino_model.bin")
    result = runner.invoke(cli, ["generate", str(folder), PROMPT, "-o", str(tmp_path / "raw.png")])
    assert result.exit_code == 1 and "enginekit import" in result.output, result.output
    result = runner.invoke(cli, ["import", str(folder), "--adopt"])
    assert result.exit_code == 0, result.output
    adopted = read_manifest(folder)
    assert adopted.digest() == linked.replace(provenance=adopted.provenance).digest()  # the same files, hashed in place
    assert (folder / "enginekit" / "tokenizer" / "tokenizer.json").is_file()
    result = runner.invoke(cli, ["generate", str(folder), PROMPT, "--steps", "1", "--height", str(SIZE),
                                 "--width", str(SIZE), "-o", str(tmp_path / "fox.png")])
    assert result.exit_code == 0 and (tmp_path / "fox.png").is_file(), result.output
    result = runner.invoke(cli, ["import", str(folder), "--adopt"])
    assert result.exit_code == 1 and "already has a manifest.json" in result.output
    result = runner.invoke(cli, ["quantize", str(folder), "-o", str(tmp_path / "q")])
    assert result.exit_code == 1 and "optimum's: quantize with optimum-cli" in result.output and not (tmp_path / "q").exists()
    with pytest.raises(ArtifactError, match="already has a manifest.json"):
        import_folder(folder, tmp_path / "again")
    # a vendor file changed after the import is caught at load, never run
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text() + " ")
    with pytest.raises(IntegrityError, match="scheduler_config.json"):
        enginekit.load(folder)


def test_the_import_needs_no_torch_where_the_tokenizers_are_saved_fast(optimum_folders: dict, tmp_path: Path) -> None:
    """An edge box with enginekit[openvino] alone imports a folder whose tokenizers have tokenizer.json
    (only converting a slow CLIP tokenizer needs transformers, and says so)."""
    from ..core.test_no_torch import _BLOCKER

    code = _BLOCKER + (
        "from enginekit.export.importer import import_folder\n"
        f"import_folder({str(optimum_folders['tiny-flux'])!r}, {str(tmp_path / 'flux')!r})\n"
        "try:\n"
        f"    import_folder({str(optimum_folders['tiny-sd15'])!r}, {str(tmp_path / 'sd15')!r})\n"
        "except Exception as exc:\n"
        "    print('REFUSED', exc)\n"
        "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY []" in done.stdout and "needs transformers: pip install 'enginekit[export]'" in done.stdout
    assert (tmp_path / "flux" / "manifest.json").is_file() and not (tmp_path / "sd15").exists()


class _Echo(Runner):
    """An engine that gives back what it was fed, under its own output names."""

    def __init__(self) -> None:
        super().__init__([TensorSpec("hidden_states", "float32", ("batch", 2)), TensorSpec("timestep", "int64", (1,))],
                         [TensorSpec("out_hidden_states", "float32", ("batch", 2)), TensorSpec("t", "int64", (1,))])

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"out_hidden_states": feeds["hidden_states"], "t": feeds["timestep"]}


def test_the_interface_renames_and_feeds_one_row_only_when_the_rows_agree() -> None:
    interface = {"inputs": {"sample": "hidden_states"}, "outputs": {"out_sample": "out_hidden_states"},
                 "one_row": ["timestep"]}
    runner = with_interface(_Echo(), Component("transformer", "x", (), (), (), interface=interface))
    assert [s.name for s in runner.inputs] == ["sample", "timestep"] and runner.inputs[1].shape == ("batch",)
    sample = np.ones((3, 2), dtype=np.float32)
    out = runner.run({"sample": sample, "timestep": np.array([5, 5, 5])})
    assert set(out) == {"out_sample", "t"} and out["t"].tolist() == [5]
    with pytest.raises(ShapeError, match="one 'timestep' for the whole batch"):
        runner.run({"sample": sample, "timestep": np.array([5, 4, 5])})
    assert runner.run({"sample": sample[:1], "timestep": np.array([7])})["t"].tolist() == [7]
    with pytest.raises(ManifestError, match="interface"):
        Component.from_dict("unet", {"entry": "x", "files": [], "inputs": [], "outputs": [],
                                     "interface": {"inputs": {"sample": 3}}})


@pytest.mark.skipif(not PEERS.is_file(), reason="the peers' environment (optimum-intel) is not installed")
def test_a_folder_optimum_intel_exported_draws_diffusers_image(tmp_path: Path) -> None:
    """optimum-intel's own export of a seeded SD 1.5 folder, imported: the image diffusers draws
    from the same latents (optimum runs in the peers' environment, diffusers here)."""
    import torch

    from benchmarks.peers import build_model

    model = tmp_path / "diffusers"
    build_model("tiny-sd15", model, seed=0)
    script = ("import sys; from optimum.intel import OVDiffusionPipeline; "
              "OVDiffusionPipeline.from_pretrained(sys.argv[1], export=True, compile=False).save_pretrained(sys.argv[2])")
    done = subprocess.run([str(PEERS), "-c", script, str(model), str(tmp_path / "ov")], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = import_folder(tmp_path / "ov", tmp_path / "imported")
    assert manifest.components["unet"].interface == {"one_row": ["timestep"]}
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        reference = pipe(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, latents=noise, output_type="np",
                         **CALLS["tiny-sd15"]).images[0]
    with enginekit.load(tmp_path / "imported", device="cpu") as ours:
        image = ours(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, latents=noise.numpy(), output_type="np",
                     **CALLS["tiny-sd15"]).images[0]
    assert psnr(reference, np.asarray(image, dtype=np.float32)) >= 40.0
