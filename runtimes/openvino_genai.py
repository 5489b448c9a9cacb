"""OpenVINO GenAI's folder layout, written from an enginekit OpenVINO pipeline.

``openvino_genai.Text2ImagePipeline(folder, "CPU")`` reads the folder ``optimum-cli export
openvino`` writes: ``model_index.json``, ``scheduler/``, one folder per model holding
``openvino_model.xml``/``.bin`` and its ``config.json``, the VAE split into ``vae_decoder/`` and
``vae_encoder/``, and each tokenizer converted to ``openvino_tokenizer.xml`` by
openvino-tokenizers. It reads the models by position and by optimum's names, so each IR is
rewritten to that contract from enginekit's (the weights unchanged):

- a text encoder's outputs go in optimum's order and names: ``CLIPTextModel`` gives the last
  hidden state then ``pooler_output``, ``CLIPTextModelWithProjection`` ``text_embeds`` then the
  last hidden state; then ``hidden_states.0`` .. ``hidden_states.N``, where GenAI reads SDXL's and
  SD3's penultimate layer (position ``N + 1``) and optimum-intel ``hidden_states[-2]``. The export
  keeps only the last two layers, so ``hidden_states.0`` .. ``N-2`` are zeros: a ``clip_skip``
  above 1 in optimum-intel reads them (enginekit's own runtime takes at most the penultimate);
  enginekit's ``pooled`` comes last;
- the UNet keeps its one noise output (GenAI reads "the" output; enginekit's DeepCache features
  are dropped) and takes an int64 ``timestep``, as GenAI feeds it;
- a transformer's latent input answers to ``hidden_states`` as well as enginekit's ``sample``.

The folder is an enginekit artifact too (its manifest lists these IRs), so ``enginekit.load``,
``generate`` and ``bench`` run the very files GenAI runs. It needs ``openvino-tokenizers`` (and
``transformers``, to read the tokenizer) at write time; loading needs neither.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from enginekit.artifact import atomic_artifact, make_assets, make_component, write_manifest
from enginekit.errors import ArtifactError, BackendError, InputError, one_line
from enginekit.manifest import Manifest, TensorSpec, read_manifest

__all__ = ["GENAI_PIPELINES", "LAYOUT", "check_genai_backend", "write_genai_layout"]

LAYOUT = "openvino-genai"
#: The pipeline classes ``Text2ImagePipeline`` runs (its ``text2image_pipeline.cpp``).
GENAI_PIPELINES = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline", "StableDiffusionXLPipeline",
                   "StableDiffusion3Pipeline", "FluxPipeline")
MODEL_XML = "openvino_model.xml"
_CLIP_WITH_PROJECTION = "CLIPTextModelWithProjection"
#: enginekit's scheduler names -> the diffusers classes GenAI runs (its ``schedulers/types.cpp``).
_GENAI_SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
                     "ddim": "DDIMScheduler", "lcm": "LCMScheduler", "flow-euler": "FlowMatchEulerDiscreteScheduler"}


def _scheduler_config(src: Path, tc: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler enginekit runs by default, resolved from the pipeline's config as
    ``from_config`` resolves it (a PNDM file's ``timestep_spacing`` left to Euler's default),
    written as the class GenAI runs: both sides run the same schedule unless told otherwise.
    A default GenAI has no port of keeps the pipeline's own file."""
    import dataclasses

    from enginekit.runtimes.schedulers import make_scheduler

    config = json.loads((src / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    name = str(tc.get("default_scheduler"))
    if name not in _GENAI_SCHEDULERS:
        return config
    resolved = dataclasses.asdict(make_scheduler(name, tc.get("scheduler") or config).config)
    if resolved.get("trained_betas") is not None:
        resolved["trained_betas"] = list(resolved["trained_betas"])
    return {"_class_name": _GENAI_SCHEDULERS[name], **resolved}


def _model_index(src: Path) -> dict[str, Any]:
    try:
        return json.loads((src / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{src}: no readable model_index.json ({one_line(exc)})") from exc


def _recorded_config(src: Path, manifest: Manifest, name: str, component: str) -> dict[str, Any]:
    """The config.json the export recorded for source component ``name`` (``vae`` for both VAE
    halves), or the one this layout wrote beside ``component`` (rewriting a GenAI folder)."""
    recorded = {a.path for a in manifest.assets}
    for rel in (f"{name}/config.json", f"{component}/config.json"):
        if rel in recorded:
            return json.loads((src / rel).read_text(encoding="utf-8"))
    raise ArtifactError(f"{src} records no {name}/config.json (it was exported before enginekit kept each "
                        "component's config): export it again to write OpenVINO GenAI's layout")


def _ports(model: Any, name: str, component: str) -> Any:
    """The tensor that ``model``'s output ``name`` returns (what its Result node reads)."""
    for port in model.outputs:
        if name in port.get_names():
            return port.get_node().input_value(0)
    raise BackendError(f"{component}: the engine has no output {name!r} (it has "
                       f"{', '.join(sorted(n for p in model.outputs for n in p.get_names()))})")


def _named(value: Any, name: str) -> Any:
    """A copy of ``value`` under its own tensor name (a no-op the compiler removes): one tensor
    cannot answer to two tools' names at two output positions."""
    import openvino.opset13 as ops

    node = ops.convert(value, value.get_element_type())
    node.output(0).set_names({name})
    return node.output(0)


def _text_encoder(model: Any, component: str, cls: str, config: Mapping[str, Any]) -> Any:
    """optimum's outputs, in its order (see the module's docstring); enginekit's ``pooled`` last."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    names = {n for p in model.outputs for n in p.get_names()}
    last = _ports(model, "last_hidden_state", component)
    if "pooled" not in names:  # T5: its one output is the last hidden state
        return ov.Model([ops.result(last)], model.get_parameters(), model.get_friendly_name())
    pooled = _ports(model, "pooled", component)
    if cls == _CLIP_WITH_PROJECTION:
        order = [_named(pooled, "text_embeds"), last]
    else:
        order = [last, _named(pooled, "pooler_output")]
    if "penultimate_hidden_state" in names:
        layers = max(int(config.get("num_hidden_layers") or 1), 1)
        penultimate = _ports(model, "penultimate_hidden_state", component)
        for k in range(layers - 1):  # layers the export does not keep: zeros, never a wrong layer
            zeros = ops.multiply(penultimate, np.float32(0))
            zeros.output(0).set_names({f"hidden_states.{k}"})
            order.append(zeros.output(0))
        penultimate.get_tensor().add_names({f"hidden_states.{layers - 1}"})
        order += [penultimate, _named(last, f"hidden_states.{layers}")]
    order.append(pooled)
    return ov.Model([ops.result(p) for p in order], model.get_parameters(), model.get_friendly_name())


def _denoiser(model: Any, component: str) -> Any:
    import openvino as ov
    import openvino.opset13 as ops

    out = ov.Model([ops.result(_ports(model, "out_sample", component))], model.get_parameters(),
                   model.get_friendly_name())
    if component == "unet":  # GenAI's UNet pipelines feed the timestep as int64
        ppp = ov.preprocess.PrePostProcessor(out)
        ppp.input("timestep").tensor().set_element_type(ov.Type.i64)
        out = ppp.build()
    else:  # SD3's and FLUX's transformers: GenAI sets the latents as "hidden_states"
        for port in out.inputs:
            if "sample" in port.get_names():
                port.get_tensor().add_names({"hidden_states"})
    return out


def _convert_tokenizer(src: Path, out: Path, spec: Mapping[str, Any], cls: str | None) -> list[str]:
    """``tokenizer.json`` converted by openvino-tokenizers, as optimum-cli does."""
    try:
        import openvino as ov
        from openvino_tokenizers import convert_tokenizer
        from transformers import PreTrainedTokenizerFast
    except ImportError as exc:
        raise BackendError("writing OpenVINO GenAI's layout converts the tokenizers with openvino-tokenizers: "
                           f"pip install 'enginekit[genai]' ({one_line(exc)})") from exc
    special = {k: spec[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token") if spec.get(k)}
    hf = PreTrainedTokenizerFast(tokenizer_file=str(src / spec["file"]), model_max_length=int(spec["max_length"]),
                                 **special)
    folder = out / Path(spec["file"]).parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        converted = convert_tokenizer(hf, with_detokenizer=True)
    except Exception as exc:  # noqa: BLE001 - the converter's own failure, said in one line
        raise BackendError(f"openvino-tokenizers could not convert {spec['file']}: {one_line(exc)}") from exc
    tok, detok = converted if isinstance(converted, tuple) else (converted, None)
    rels = [f"{folder.name}/openvino_tokenizer.xml", f"{folder.name}/openvino_tokenizer.bin"]
    # transformers' files beside it, as save_pretrained writes them (and a BPE's vocab.json and
    # merges.txt, which the slow CLIPTokenizer optimum-intel loads reads): tools other than GenAI
    # read the folder's tokenizer through transformers.
    hf.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    if cls and config_path.is_file():  # the class the pipeline names (model_index.json), not transformers 5's
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.pop("backend", None)
        config_path.write_text(json.dumps({**config, "tokenizer_class": cls}, indent=2) + "\n", encoding="utf-8")
    if type(hf.backend_tokenizer.model).__name__ == "BPE":
        hf.backend_tokenizer.model.save(str(folder))
    rels += [f"{folder.name}/{p.name}" for p in sorted(folder.iterdir())
             if p.suffix in (".json", ".txt") and p.name != "tokenizer.json"]
    ov.save_model(tok, str(out / rels[0]))
    if detok is not None:
        ov.save_model(detok, str(folder / "openvino_detokenizer.xml"))
        rels += [f"{folder.name}/openvino_detokenizer.xml", f"{folder.name}/openvino_detokenizer.bin"]
    return [r for r in rels if (out / r).exists()]


def check_genai_backend(backend: str) -> None:
    """GenAI's layout holds OpenVINO IRs: any other backend is refused in one line."""
    if backend != "openvino":
        raise InputError(f"--genai writes OpenVINO GenAI's folder layout: it takes --backend openvino, not {backend}")


def write_genai_layout(src: str | Path, out: str | Path, *, overwrite: bool = False,
                       on_step: Callable[[str], Any] = lambda msg: None) -> Manifest:
    """Write OpenVINO GenAI's (and optimum-intel's) folder for the OpenVINO pipeline ``src``
    to ``out`` (atomically): ``openvino_genai.Text2ImagePipeline(out, "CPU")`` runs it, and so
    does ``enginekit.load(out)``."""
    import openvino as ov

    from enginekit.registry import GENAI_LAYOUT, expect_stage
    from enginekit.runtimes.openvino_shapes import specs as port_specs

    src, out = Path(src), Path(out)
    manifest = read_manifest(src)
    expect_stage(manifest.task, "genai_layout", GENAI_LAYOUT)
    if manifest.kind != "openvino":
        raise InputError(f"{src} is a {manifest.kind} {manifest.task} artifact; OpenVINO GenAI's layout is "
                         "written from an OpenVINO text-to-image pipeline (compile -b openvino --genai)")
    index = _model_index(src)
    pipeline = index.get("_class_name")
    if pipeline not in GENAI_PIPELINES:
        raise InputError(f"{src}: OpenVINO GenAI's Text2ImagePipeline runs {', '.join(GENAI_PIPELINES)}, "
                         f"not {pipeline}")
    tc = manifest.task_config
    core = ov.Core()
    components: dict[str, Any] = {}
    assets: list[str] = []
    with atomic_artifact(out, overwrite=overwrite, inputs=(src,)) as tmp:
        for comp in manifest.components.values():
            on_step(f"{comp.name}: {MODEL_XML}")
            source_name = "vae" if comp.name.startswith("vae_") else comp.name
            config = _recorded_config(src, manifest, source_name, comp.name)
            model = core.read_model(str(src / comp.entry))
            try:
                if comp.name.startswith("text_encoder"):
                    model = _text_encoder(model, comp.name, str((index.get(comp.name) or [None, ""])[1]), config)
                elif comp.name == tc.get("denoiser"):
                    model = _denoiser(model, comp.name)
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001 - OpenVINO's own failure, said in one line
                raise BackendError(f"{comp.name}: could not rewrite the IR for GenAI: {one_line(exc)}") from exc
            (tmp / comp.name).mkdir(parents=True, exist_ok=True)
            entry = f"{comp.name}/{MODEL_XML}"
            ov.save_model(model, str(tmp / entry), compress_to_fp16=False)
            (tmp / comp.name / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                                         encoding="utf-8")
            assets.append(f"{comp.name}/config.json")
            outputs = list({s.name: s for s in port_specs(model.outputs, comp.outputs)}.values())
            inputs = [s if s.name != "timestep" or comp.name != "unet" else TensorSpec(s.name, "int64", s.shape)
                      for s in port_specs(model.inputs, comp.inputs)]
            components[comp.name] = make_component(tmp, comp.name, entry, [entry, entry[:-4] + ".bin"], inputs,
                                                   outputs, comp.precision, quantization=comp.quantization,
                                                   fidelity=comp.fidelity)
            del model
        for name, spec in tc.get("tokenizers", {}).items():
            on_step(f"{name}: openvino_tokenizer.xml")
            target = tmp / spec["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / spec["file"], target)
            cls = (index.get(name) or [None, None])[1]
            assets += [spec["file"], *_convert_tokenizer(src, tmp, spec, cls)]
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(_scheduler_config(src, tc), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        shutil.copy2(src / "model_index.json", tmp / "model_index.json")
        assets += ["scheduler/scheduler_config.json", "model_index.json"]
        result = manifest.replace(
            components=components, assets=make_assets(tmp, assets),
            target={**manifest.target, "layout": LAYOUT},
            provenance={**manifest.provenance, "parent": {"path": str(src.resolve()), "kind": manifest.kind,
                                                          "manifest_sha256": manifest.digest()}})
        write_manifest(tmp, result)
    return result
