"""The text-to-image reader of ``enginekit import``: a pipeline folder optimum wrote.

optimum-cli (OpenVINO) and optimum's ONNX export write a diffusers pipeline as ``model_index.json``,
``scheduler/scheduler_config.json``, one folder per model with its engine and ``config.json`` (the
VAE as ``vae_decoder/`` and ``vae_encoder/``) and the tokenizers as transformers saves them. That
is the folder the export reads, less the PyTorch weights: the family registry recognises it
(:func:`~enginekit.export.diffusion.families.detect_family`) and the family writes the manifest's
``text-to-image`` section from the same configs (:meth:`DiffusionFamily.task_config`, given a
stand-in pipeline that holds only them), so an imported pipeline runs with its family's layout
and defaults as an exported one does. Component names are enginekit's already (``text_encoder``,
``unet``/``transformer``, ``vae_decoder``, ``vae_encoder``); each engine's interface is read
from the engine (:mod:`enginekit.export.import_engines`).

A tokenizer folder with ``tokenizer.json`` is used as it is (read with ``tokenizers`` alone); one
with a slow CLIP tokenizer's ``vocab.json`` and ``merges.txt`` (what optimum-intel saves) is
converted by transformers to ``enginekit/<tokenizer>/tokenizer.json``, checked id for id on
probe prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

from enginekit.errors import ArtifactError, ManifestError, SourceError, one_line
from enginekit.export.diffusion.families import TEXT_ENCODERS, detect_family, families
from enginekit.export.import_engines import (denoiser_interface, find_engine, name_dims, read_engine,
                                             single_interface, text_encoder_interface)
from enginekit.export.importer import GENERATED, ComponentPlan, FolderPlan
from enginekit.export.json_files import jsonable, read_json

__all__ = ["read_pipeline_folder"]

TASK = "text-to-image"
#: Where a pipeline folder keeps its VAE's config: optimum's halves, or diffusers' own folder.
_VAE_CONFIGS = ("vae_decoder/config.json", "vae_encoder/config.json", "vae/config.json")
#: transformers' tokenizer classes (by prefix) -> enginekit's tokenizer kinds.
_TOKENIZER_KINDS = {"CLIPTokenizer": "clip", "T5Tokenizer": "t5"}
_DEFAULT_PAD = {"clip": "<|endoftext|>", "t5": "<pad>"}
_NO_LIMIT = 1_000_000


class _Config(dict):
    """A config.json read as diffusers' configs are: by key or attribute; an absent key is None
    (a hub config written before the key existed)."""

    def __getattr__(self, key: str) -> Any:
        return self.get(key)


def _listed(index: Mapping[str, Any], name: str) -> str | None:
    """The class model_index.json gives component ``name``, None where it is absent or null."""
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and entry[1] is not None:
        return str(entry[1])
    return None


def read_pipeline_folder(src: Path, scratch: Path, on_step: Callable[[str], Any] = lambda msg: None
                         ) -> FolderPlan | None:
    """The plan for the pipeline folder ``src`` (None when it has no model_index.json); a class no
    family runs, a missing component or config is refused in one line. Converted tokenizers go to
    ``scratch`` (which becomes the artifact's ``enginekit/``)."""
    if not (src / "model_index.json").is_file():
        return None
    index = read_json(src / "model_index.json")
    cls = index.get("_class_name")
    try:
        family, how, _ = detect_family(src)
    except SourceError:
        classes = ", ".join(sorted({f.pipeline_class for f in families()}))
        raise SourceError(f"{src}: model_index.json names the pipeline {cls!r}; enginekit imports {classes}") from None
    encoders = [n for n in TEXT_ENCODERS if _listed(index, n)]
    models = [*encoders, family.denoiser, "vae_decoder"]
    entries = {name: find_engine(src, name) for name in [*models, "vae_encoder"]}
    missing = [name for name in models if entries[name] is None]  # the VAE encoder: image-to-image only
    if missing:
        raise SourceError(f"{src}: the {cls} needs {missing[0]}/openvino_model.xml (or {missing[0]}/model.onnx), "
                          "which the folder lacks")
    engines = {}
    for name, found in entries.items():
        if found is not None:
            on_step(f"{name}: reading {found[0]}")
            engines[name] = read_engine(src, *found)
    kinds = sorted({e.kind for e in engines.values()})
    if len(kinds) > 1:
        raise SourceError(f"{src}: its components mix {' and '.join(kinds)} engines; enginekit imports one kind")
    section = _section(src, index, family, encoders)
    interfaces = {spec["component"]: text_encoder_interface(str(src), spec["component"], engines[spec["component"]],
                                                            spec["hidden_state"], spec["use_pooled"])
                  for spec in section["text_encoders"]}
    interfaces[family.denoiser] = denoiser_interface(str(src), family.denoiser, engines[family.denoiser])
    interfaces["vae_decoder"] = single_interface(str(src), "vae_decoder", engines["vae_decoder"], "latent_sample",
                                                 "sample")
    if "vae_encoder" in engines:
        interfaces["vae_encoder"] = single_interface(str(src), "vae_encoder", engines["vae_encoder"], "sample",
                                                     "latent_parameters")
    roles = {family.denoiser: "denoiser", "vae_decoder": "vae_decoder", "vae_encoder": "vae_encoder"}
    components = [ComponentPlan(name, name_dims(engines[name], roles.get(name, "text_encoder"), interface), interface)
                  for name, interface in interfaces.items()]
    for spec in section["text_encoders"]:
        name = spec["tokenizer"]
        on_step(f"{name}: reading the tokenizer")
        section["tokenizers"][name] = _tokenizer(src, name, index, section, scratch)
    _check_section(src, section)
    return FolderPlan(task=TASK, family=family.name, kind=kinds[0], components=tuple(components), task_config=section,
                      described=f"a {cls} ({kinds[0]})",
                      provenance={"pipeline": cls, "family_by": how, "source": index.get("_name_or_path"),
                                  "diffusers_version": index.get("_diffusers_version")})


def _section(src: Path, index: Mapping[str, Any], family: Any, encoders: list[str]) -> dict[str, Any]:
    """The family's ``text-to-image`` section, from a stand-in pipeline holding the folder's configs."""
    pipe = type(str(index.get("_class_name")), (), {})()
    pipe.config = _Config(index)
    pipe.scheduler = SimpleNamespace(config=_Config(_read(src, "scheduler/scheduler_config.json")))
    vae = next((rel for rel in _VAE_CONFIGS if (src / rel).is_file()), _VAE_CONFIGS[0])
    pipe.vae = SimpleNamespace(config=_Config(_read(src, vae)))
    for name in [*encoders, family.denoiser]:
        setattr(pipe, name, SimpleNamespace(config=_Config(_read(src, f"{name}/config.json"))))
    try:
        section = family.task_config(pipe)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SourceError(f"{src}: the component configs do not describe a {family.title} pipeline "
                          f"({one_line(exc)})") from None
    return jsonable(section)


def _read(src: Path, rel: str) -> dict[str, Any]:
    if not (src / rel).is_file():
        raise SourceError(f"{src}: {rel} is missing (optimum writes each component's config beside its engine)")
    return read_json(src / rel)


def _check_section(src: Path, section: dict[str, Any]) -> None:
    """The section as the runtime will read it: its layout and every field it needs."""
    from enginekit.runtimes.tasks.layouts import layout_for
    from enginekit.runtimes.tasks.pipeline_config import PipelineConfig

    try:
        layout_for(PipelineConfig.from_section(section))
    except ManifestError as exc:
        raise SourceError(f"{src}: {exc}") from None


def _tokenizer(src: Path, name: str, index: Mapping[str, Any], section: Mapping[str, Any],
               scratch: Path) -> dict[str, Any]:
    """The manifest's config for tokenizer ``name``: its tokenizer.json as it is, or one converted
    from vocab.json/merges.txt (or spiece.model) by transformers into ``scratch``."""
    folder = src / name
    settings = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    cls = _listed(index, name) or str(settings.get("tokenizer_class") or "")
    kind = next((k for prefix, k in _TOKENIZER_KINDS.items() if cls.startswith(prefix)), None)
    if kind is None:
        raise SourceError(f"{src}: {name} is a {cls or 'tokenizer of no known class'}; enginekit's pipelines "
                          "tokenize with CLIP's and T5's tokenizers")
    t5 = kind == "t5"
    length = int(section.get("max_sequence_length") or 256) if t5 else _clip_length(settings)
    if (folder / "tokenizer.json").is_file():
        return _from_file(src, f"{name}/tokenizer.json", kind, length, settings)
    sources = ("spiece.model",) if t5 else ("vocab.json", "merges.txt")
    if not all((folder / f).is_file() for f in sources):
        raise SourceError(f"{src}: {name}/ holds no tokenizer.json, nor {' and '.join(sources)}")
    try:
        from enginekit.export.diffusion.tokenizer import save_tokenizer, tokenizer_for

        config = save_tokenizer(tokenizer_for(src, name), scratch / name, max_length=length if t5 else None)
    except ImportError as exc:
        raise SourceError(f"{src}: {name}/ has no tokenizer.json; converting its {' and '.join(sources)} needs "
                          f"transformers: pip install 'enginekit[export]' ({one_line(exc)})") from None
    return {**config, "file": f"{GENERATED}/{name}/{config['file']}"}


def _clip_length(settings: Mapping[str, Any]) -> int:
    length = settings.get("model_max_length")
    return int(length) if isinstance(length, int) and 0 < length < _NO_LIMIT else 77


def _special(folder: Path, settings: Mapping[str, Any], key: str) -> str | None:
    """A special token as transformers reads it (special_tokens_map.json over tokenizer_config.json)."""
    for data in (read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file()
                 else {}, settings):
        value = data.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value:
            return str(value)
    return None


def _from_file(src: Path, rel: str, kind: str, length: int, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The config of a saved tokenizer.json, read with ``tokenizers`` alone: the special ids from its
    own post-processor, the pad token from transformers' files; checked by loading it as the runtime does."""
    import tokenizers

    from enginekit.runtimes.tasks.tokenizers import PromptTokenizer, TokenizerConfig

    try:
        tok = tokenizers.Tokenizer.from_file(str(src / rel))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises plain Exception
        raise SourceError(f"{src}: {rel} does not load ({one_line(exc)})") from None
    tok.no_padding()
    tok.no_truncation()
    specials = tok.post_process(tok.encode("", add_special_tokens=False)).ids
    bos, eos = (specials[0], specials[-1]) if len(specials) == 2 else (None, specials[-1] if specials else None)
    pad = _special((src / rel).parent, settings, "pad_token") or _DEFAULT_PAD[kind]
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise SourceError(f"{src}: {rel} has no id for its pad token {pad!r}")
    normalizer = json.loads(tok.to_str()).get("normalizer")
    config = TokenizerConfig(kind=kind, file=rel, max_length=length, pad_token=pad, pad_token_id=int(pad_id),
                             bos_token_id=bos, eos_token_id=eos, vocab_size=tok.get_vocab_size(with_added_tokens=True),
                             lowercase=_lowercases(normalizer))
    try:
        PromptTokenizer(tok, config)
    except (ArtifactError, ManifestError) as exc:
        raise SourceError(f"{src}: {rel}: {exc}") from None
    return config.to_dict()


def _lowercases(normalizer: Any) -> bool:
    from enginekit.export.diffusion.tokenizer import _lowercases as lowercases

    return lowercases(normalizer)
