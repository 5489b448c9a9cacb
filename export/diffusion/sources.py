"""Diffusion pipeline sources for export: a diffusers folder, a single-file checkpoint,
a hub id, a built-in tiny twin, or a real architecture with seeded weights.

Every source resolves to a :class:`PipelineSource`: the loaded diffusers pipeline
(fp32, eval mode), its family (a name registered in :mod:`.families`) and where it
came from. Everything family-specific (recognition, pipeline arguments, T5 rules, the
single-file layout) is asked of the family's registry entry. Weights are never
unpickled: folders must hold safetensors, single files must be ``.safetensors``.

Specs understood by :func:`resolve_pipeline`:

``tiny-sd15``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-sd35``, ``tiny-flux``
    seeded tiny twins with the real component structure (configs in
    ``enginekit/configs/tiny-*``) and the real CLIP BPE tokenizers: unit-test fast.
``sd15``, ``sd21``, ``sdxl``, ``sd3-medium``, ``sd35-medium``, ``sd35-large``, ``flux-dev``,
``flux-schnell`` with ``random_weights=True``
    the published architectures (configs kept in ``enginekit/configs/<family>``)
    with seeded weights, for offline benchmarks.
a folder
    a pipeline written by ``save_pretrained`` (``model_index.json`` + component
    subfolders); the family is read from the pipeline class and the UNet config.
a ``.safetensors`` file
    an original-LDM-format checkpoint as A1111/sdnext keep them; ``family`` is
    required and names the config folder used (nothing is fetched).
``org/name`` or ``hf-hub:org/name[@revision]``
    a Hugging Face Hub repository (honours ``HF_HUB_OFFLINE``), loaded as a folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enginekit.artifact import sha256_file
from enginekit.errors import SourceError, one_line
from enginekit.export.diffusion.families import (DiffusionFamily, check_family, detect_family, families,
                                                 family_names, get_family, is_inpainting_checkpoint)
from enginekit.export.diffusion.tokenizer import tokenizer_for as _tokenizer_for
from enginekit.export.json_files import read_json

__all__ = ["FAMILIES", "BUILTINS", "ARCHITECTURES", "PipelineSource", "resolve_pipeline", "config_dir"]

#: Pipeline families, as the manifest names them (the registry's names, at import).
FAMILIES = family_names()
#: Built-in tiny twins: name -> family.
BUILTINS = {b: f.name for f in families() for b in f.builtins}
#: Published architectures built with seeded weights (``--random-weights``): name -> family.
#: Where each config's values come from: enginekit/configs/__init__.py.
ARCHITECTURES = {c: f.name for f in families() for c in f.configs}
_WEIGHT_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
_HUB_PATTERNS = [
    "model_index.json", "*/config.json", "*/scheduler_config.json", "*/*.safetensors.index.json",
    "tokenizer*/*.json", "tokenizer*/*.txt", "*/model.safetensors", "*/model-*-of-*.safetensors",
    "*/diffusion_pytorch_model.safetensors", "*/diffusion_pytorch_model-*-of-*.safetensors",
]


@dataclass
class PipelineSource:
    """A diffusers pipeline ready to export, with its family and provenance."""

    pipeline: Any  # diffusers.StableDiffusionPipeline | StableDiffusionXLPipeline, fp32, eval
    family: str
    provenance: dict[str, Any] = field(default_factory=dict)
    #: Streaming sources (``empty_weights=True``): the components' parameters are fake tensors and
    #: their weights come from these, one tensor at a time (component name -> WeightSource).
    weights: dict[str, Any] | None = None


def config_dir(name: str) -> Path:
    """The repository's config folder for a family or built-in (``enginekit/configs/<name>``)."""
    import enginekit.configs

    path = Path(enginekit.configs.__file__).parent / name
    if not (path / "model_index.json").is_file():
        raise SourceError(f"enginekit ships no pipeline config named {name!r}")
    return path


def resolve_pipeline(
    spec: str,
    *,
    family: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    revision: str | None = None,
    config: str | Path | None = None,
    without_t5: bool = False,
    empty_weights: bool = False,
) -> PipelineSource:
    """Load the pipeline named by ``spec`` (see the module docstring for the forms).

    ``family`` validates (or, where the pipeline cannot tell, decides) the family;
    a single file needs it. ``config`` points a single file at another config folder
    (a diffusers pipeline layout) instead of the repository's one for ``family``.
    ``without_t5`` leaves SD3's T5 encoder out (never built or loaded), as diffusers
    allows: prompts then condition through the two CLIP encoders alone.

    ``empty_weights`` builds the components with fake parameters (no storage) and sets the
    source's ``weights`` to stream them from (seeded per tensor, or the folder's safetensors),
    for :func:`~enginekit.export.diffusion.streaming.export_streamed`; single files are refused.
    """
    if family is not None:
        get_family(family)
    src = _resolve(spec, family, random_weights, seed, revision, config, without_t5, empty_weights)
    if without_t5:
        src.provenance["without_t5"] = True
    return src


def _check_t5(where: str, family: str | None, without_t5: bool) -> None:
    if not without_t5:
        return
    why = get_family(family).no_t5_error() if family is not None else "this checkpoint has no T5 encoder"
    if why:
        raise SourceError(f"{where}: --no-t5 is for SD3/SD3.5 pipelines ({why})")


def _resolve(spec: str, family: str | None, random_weights: bool, seed: int, revision: str | None,
             config: str | Path | None, without_t5: bool, empty: bool = False) -> PipelineSource:
    skip = ("text_encoder_3", "tokenizer_3") if without_t5 else ()
    if spec in BUILTINS:
        fam = BUILTINS[spec]
        check_family(spec, fam, family)
        _check_t5(spec, fam, without_t5)
        src = _build_seeded(config_dir(spec), fam, seed, skip, empty)
        src.provenance.update(source=spec, kind="builtin", weights="random", seed=seed)
        return src
    if spec in ARCHITECTURES:
        if not random_weights:
            raise SourceError(
                f"{spec!r} names an architecture, not weights: pass --random-weights to build it with seeded "
                "weights, or give a hub id, a pipeline folder or a .safetensors checkpoint"
            )
        fam = ARCHITECTURES[spec]
        check_family(spec, fam, family)
        _check_t5(spec, fam, without_t5)
        src = _build_seeded(config_dir(spec), fam, seed, skip, empty)
        src.provenance.update(source=spec, kind="random", weights="random", seed=seed)
        return src
    if random_weights:
        raise SourceError(f"--random-weights applies to {', '.join(ARCHITECTURES)} only, not to {spec!r}")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, family, revision=None, without_t5=without_t5, empty=empty)
    if path.is_file():
        _check_t5(str(path), family, without_t5)
        return _load_single_file(path, family, config, empty)
    hub_id = spec[len("hf-hub:") :] if spec.startswith("hf-hub:") else spec
    if "@" in hub_id:
        hub_id, revision = hub_id.split("@", 1)
    if hub_id.count("/") == 1 and not spec.startswith((".", "/", "~")) and not hub_id.endswith(".safetensors"):
        return _load_hub(hub_id, revision, family, without_t5, empty)
    raise SourceError(
        f"{spec!r} is not a pipeline source: use {', '.join(BUILTINS)}, {', '.join(ARCHITECTURES)} with --random-weights, "
        "a save_pretrained folder, a .safetensors checkpoint or a hub id 'org/name'"
    )


# --------------------------------------------------------------------------- helpers


def _pipeline_class(family: str, index: dict[str, Any] | None = None) -> Any:
    import diffusers  # the family's class, or its inpainting class where ``index`` names it

    return getattr(diffusers, get_family(family).loading_class(index))


def _build_seeded(folder: Path, family: str, seed: int, skip: tuple[str, ...] = (), empty: bool = False,
                  ) -> PipelineSource:
    """Build every component from ``folder``'s configs (those in ``skip`` are left None, never
    built), each parameter drawn from its own seeded generator (:func:`.streaming.reseed_`),
    so the same seed gives the same weights built here or streamed (``empty``: fake parameters,
    the source's ``weights`` draw them when the export streams them)."""
    import torch

    from enginekit.export.diffusion import streaming

    index = read_json(folder / "model_index.json")
    components: dict[str, Any] = {}
    weights: dict[str, Any] = {}
    mode = streaming.fake_mode() if empty else None
    for name in _WEIGHT_COMPONENTS:
        if name not in index:
            continue
        if name in skip:
            components[name] = None
            continue
        torch.manual_seed(seed)  # for any buffer a constructor draws
        if empty:
            components[name] = streaming.empty_module(lambda name=name: _from_config(folder, index, name), mode)
            weights[name] = streaming.SeededWeights(seed, name)
        else:
            model = _from_config(folder, index, name)
            streaming.reseed_(model, seed, name)
            components[name] = model.eval()
    pipe = _assemble(folder, index, family, components, skip)
    return PipelineSource(pipe, family, {"family": family, "config": folder.name}, weights if empty else None)


def _from_config(folder: Path, index: dict[str, Any], name: str) -> Any:
    """Component ``name`` built from ``folder/name``'s config (the class model_index names), weights as initialised."""
    import diffusers
    import transformers

    library, cls_name = index[name]
    if library == "diffusers":
        cls = getattr(diffusers, cls_name)
        return cls.from_config(cls.load_config(str(folder / name)))
    cls = getattr(transformers, cls_name)
    return cls(cls.config_class.from_pretrained(str(folder / name)))


def _assemble(folder: Path, index: dict[str, Any], family: str, components: dict[str, Any],
              skip: tuple[str, ...]) -> Any:
    """The family's pipeline over built ``components``, with ``folder``'s scheduler and tokenizers."""
    import diffusers

    sched_cls = getattr(diffusers, index["scheduler"][1])
    components["scheduler"] = sched_cls.from_config(sched_cls.load_config(str(folder / "scheduler")))
    for name in _TOKENIZERS:
        if name in index:
            components[name] = None if name in skip else _tokenizer_for(folder, name)
    fam = get_family(family)
    kwargs = fam.pipeline_kwargs(index, loading=False)
    if fam.force_zeros_flag:
        kwargs["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", True))
    return _pipeline_class(family, index)(**components, **kwargs)


def _require_safetensors(folder: Path, index: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every component's safetensors weights (but those in ``skip``, never loaded);
    a component with only pickles is refused."""
    hashes: dict[str, str] = {}
    for name in _WEIGHT_COMPONENTS:
        if name not in index or index[name][0] is None or name in skip:
            continue
        sub = folder / name
        safe = sorted(p for p in sub.glob("*.safetensors") if p.name.count(".") == 1)  # no .fp16 variants
        if not safe:
            pickled = sorted(p.name for p in sub.glob("*") if p.suffix in _PICKLE_SUFFIXES)
            if pickled:
                raise SourceError(
                    f"{sub}: only pickled weights ({', '.join(pickled)}); enginekit never unpickles — "
                    "re-save the pipeline with save_pretrained(..., safe_serialization=True)"
                )
            raise SourceError(f"{sub}: no .safetensors weights")
        for p in safe:
            hashes[f"{name}/{p.name}"] = sha256_file(p)
    return hashes


def _load_folder(folder: Path, family: str | None, revision: str | None, without_t5: bool = False,
                 empty: bool = False) -> PipelineSource:
    if not (folder / "model_index.json").is_file():
        raise SourceError(f"{folder}: no model_index.json (expected a diffusers pipeline written by save_pretrained)")
    index = read_json(folder / "model_index.json")
    fam, how, certain = detect_family(folder)
    detected = check_family(str(folder), fam.name, family, how=how, certain=certain)
    how = how if detected == fam.name else "--family"
    _check_t5(str(folder), detected, without_t5)
    hashes = _require_safetensors(folder, index, ("text_encoder_3",) if without_t5 else ())
    # T5 and the IP-adapter image encoder are optional: absent (or null) in model_index, loaded as None.
    kwargs = get_family(detected).pipeline_kwargs(index, loading=True)
    if without_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    weights = _empty_components(folder, index, kwargs) if empty else None
    try:
        pipe = _pipeline_class(detected, index).from_pretrained(
            str(folder), use_safetensors=True, local_files_only=True, **kwargs
        )
    except Exception as exc:  # diffusers/transformers raise many kinds
        raise SourceError(f"{folder}: diffusers could not load the pipeline ({one_line(exc)})") from exc
    if not empty:
        _eval(pipe)
    provenance = {"source": str(folder.resolve()), "kind": "folder", "family": detected, "family_from": how,
                  "revision": revision, "weights_sha256": hashes}
    return PipelineSource(pipe, detected, provenance, weights)


def _empty_components(folder: Path, index: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Build each weight component of ``folder`` with fake parameters into ``kwargs`` (diffusers then
    loads only the tokenizers and scheduler); its persistent buffers are read now (they are small),
    its parameters are left to the returned sources (component name -> SafetensorsWeights)."""
    from enginekit.export.diffusion import streaming

    mode = streaming.fake_mode()
    weights: dict[str, Any] = {}
    for name in _WEIGHT_COMPONENTS:
        if name not in index or index[name][0] is None or name in kwargs:
            continue
        source = streaming.SafetensorsWeights(folder / name)
        try:
            module = streaming.empty_module(lambda name=name: _from_config(folder, index, name), mode)
        except Exception as exc:  # a config diffusers/transformers cannot build from
            raise SourceError(f"{folder / name}: could not build the component from its config ({one_line(exc)})") from exc
        streaming.load_persistent_buffers(module, source)
        kwargs[name] = module
        weights[name] = source
    return weights


def _eval(pipe: Any) -> None:
    import torch

    for name in _WEIGHT_COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.float().eval()


def _load_hub(hub_id: str, revision: str | None, family: str | None, without_t5: bool = False,
              empty: bool = False) -> PipelineSource:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - part of the export extra
        raise SourceError("hub ids need huggingface_hub: pip install 'enginekit[export]'") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        # --no-t5: T5-XXL's 19 GB are not fetched at all
        ignore = ["text_encoder_3/*", "tokenizer_3/*"] if without_t5 else None
        folder = snapshot_download(hub_id, revision=revision, allow_patterns=_HUB_PATTERNS, ignore_patterns=ignore,
                                   local_files_only=offline)
    except Exception as exc:
        hint = " (HF_HUB_OFFLINE is set and it is not in the hub cache)" if offline else ""
        raise SourceError(f"could not fetch {hub_id!r} from the hub{hint}: {one_line(exc)}") from exc
    src = _load_folder(Path(folder), family, revision, without_t5, empty)
    src.provenance.update(source=f"hf-hub:{hub_id}", kind="hub", hub_id=hub_id, revision=Path(folder).name)
    return src


# --------------------------------------------------------------------------- single files


def _inpainting_config(header: dict[str, Any], family: str, folder: Path) -> Path:
    """The family's inpainting config folder for an inpainting checkpoint, else ``folder``."""
    if not is_inpainting_checkpoint(header):
        return folder
    if not (config_dir(family).parent / f"{family}-inpainting" / "model_index.json").is_file():
        raise SourceError(f"the checkpoint is a {family} inpainting model, for which enginekit ships no config; "
                          "pass --config with a diffusers folder of its architecture")
    return config_dir(f"{family}-inpainting")


def _read_header(path: Path) -> dict[str, Any]:
    """key -> meta tensor of the right shape and dtype, from the safetensors header alone."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                         "F64": torch.float64, "I64": torch.int64}.get(sl.get_dtype(), torch.float32)
                out[key] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
    except Exception as exc:  # SafetensorError for a corrupt header, OSError for unreadable files
        raise SourceError(f"{path}: not a readable safetensors checkpoint ({one_line(exc)})") from exc
    if not out:
        raise SourceError(f"{path}: the checkpoint holds no tensors")
    return out


def _single_file_families() -> list[DiffusionFamily]:
    return [f for f in families() if f.single_file_prefix]


def _looks_like(header: dict[str, Any]) -> str | None:
    for fam in _single_file_families():
        if any(k.startswith(str(fam.single_file_prefix)) for k in header):
            return fam.name
    return None


def _check_fit(path: Path, header: dict[str, Any], family: str, folder: Path,
               recipes: dict[str, dict[str, Any]] | None = None) -> None:
    """Convert the header's meta tensors as diffusers will and compare with the architecture's
    own keys and shapes, so a checkpoint of another family or size fails here, in one line,
    instead of loading with silently random weights. ``recipes``, when given, is filled per
    component with how each converted tensor is made from the checkpoint's (for streaming)."""
    import diffusers
    import torch
    import transformers
    from diffusers.loaders import single_file_utils as sfu

    fam = get_family(family)
    looks = _looks_like(header)
    if looks is None:
        raise SourceError(f"{path}: no Stable Diffusion text encoder keys; not an SD 1.x/2.x/XL checkpoint")
    if looks != family:
        raise SourceError(f"{path}: the keys are those of a {looks} checkpoint, not {family} (--family {family})")
    index = read_json(folder / "model_index.json")
    problems: list[str] = []
    for name in _WEIGHT_COMPONENTS:
        if name not in index:
            continue
        library, cls_name = index[name]
        with torch.device("meta"):
            if library == "diffusers":
                cls = getattr(diffusers, cls_name)
                cfg = cls.load_config(str(folder / name))
                model = cls.from_config(cfg)
            else:
                cls = getattr(transformers, cls_name)
                model = cls(transformers.CLIPTextConfig.from_pretrained(str(folder / name)))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

        def convert(checkpoint: dict[str, Any], name: str = name, model: Any = model, cfg: Any = cfg) -> Any:
            if name == "unet":
                return sfu.convert_ldm_unet_checkpoint(checkpoint, cfg)
            if name == "vae":
                return sfu.convert_ldm_vae_checkpoint(checkpoint, cfg)
            if name in fam.open_clip_encoders:
                return sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=fam.single_file_prefix)
            return sfu.convert_ldm_clip_checkpoint(checkpoint)

        try:
            if recipes is None:
                got = convert(header)
            else:
                from enginekit.export.diffusion.streaming import record_conversion

                got, recipes[name] = record_conversion(header, convert)
        except Exception as exc:  # converters index keys they expect
            problems.append(f"{name}: {one_line(exc)}")
            continue
        if not hasattr(model, "text_model") and name.startswith("text_encoder"):
            got = {k.removeprefix("text_model."): v for k, v in got.items()}
            if recipes is not None:
                recipes[name] = {k.removeprefix("text_model."): v for k, v in recipes[name].items()}
        got_shapes = {k: tuple(v.shape) for k, v in got.items() if v is not None}
        missing = [k for k in expected if k not in got_shapes and not k.endswith("position_ids")]
        wrong = [k for k in expected if k in got_shapes and got_shapes[k] != expected[k]]
        if missing or wrong:
            example = (missing or wrong)[0]
            problems.append(f"{name}: {len(missing)} weights missing, {len(wrong)} of another shape (e.g. {example})")
    if problems:
        raise SourceError(f"{path}: does not fit the {family} architecture of {folder} — {'; '.join(problems)}")


def _load_single_file(path: Path, family: str | None, config: str | Path | None, empty: bool = False,
                      ) -> PipelineSource:
    if path.suffix in _PICKLE_SUFFIXES:
        raise SourceError(f"{path}: pickled checkpoints are never loaded; convert it to .safetensors first")
    if path.suffix != ".safetensors":
        raise SourceError(f"{path}: a single-file source must be a .safetensors checkpoint")
    single = tuple(f.name for f in _single_file_families())
    if family is None:
        raise SourceError(f"{path}: a single-file checkpoint needs --family ({', '.join(single)})")
    if family not in single:
        raise SourceError(f"{path}: single-file checkpoints are read for {', '.join(single)}; "
                          f"export a {family} pipeline from its diffusers folder")
    folder = Path(config) if config is not None else config_dir(family)
    if not (folder / "model_index.json").is_file():
        raise SourceError(f"{folder}: the config folder has no model_index.json")
    header = _read_header(path)
    folder = _inpainting_config(header, family, folder) if config is None else folder
    recipes: dict[str, dict[str, Any]] | None = {} if empty else None
    _check_fit(path, header, family, folder, recipes)
    del header
    index = read_json(folder / "model_index.json")
    provenance = {"source": str(path.resolve()), "kind": "single_file", "family": family,
                  "config": str(folder.resolve()) if config is not None else folder.name,
                  "weights_sha256": sha256_file(path)}
    if recipes is not None:
        return _empty_single_file(path, folder, index, family, recipes, provenance)
    kwargs: dict[str, Any] = {name: _tokenizer_for(folder, name) for name in _TOKENIZERS if name in index}
    kwargs.update(get_family(family).pipeline_kwargs(index, loading=False))
    try:
        pipe = _pipeline_class(family, index).from_single_file(str(path), config=str(folder), local_files_only=True, **kwargs)
    except Exception as exc:
        raise SourceError(f"{path}: diffusers could not load the checkpoint as {family} ({one_line(exc)})") from exc
    _eval(pipe)
    return PipelineSource(pipe, family, provenance)


def _empty_single_file(path: Path, folder: Path, index: dict[str, Any], family: str,
                       recipes: dict[str, dict[str, Any]], provenance: dict[str, Any]) -> PipelineSource:
    """The single file's pipeline with fake parameters over ``folder``'s configs, each weight
    converted from the checkpoint as diffusers converts it when the export streams it."""
    from enginekit.export.diffusion import streaming

    mode = streaming.fake_mode()
    components: dict[str, Any] = {}
    weights: dict[str, Any] = {}
    for name in _WEIGHT_COMPONENTS:
        if name not in index:
            continue
        source = streaming.SingleFileWeights(path, recipes[name])
        module = streaming.empty_module(lambda name=name: _from_config(folder, index, name), mode)
        streaming.load_persistent_buffers(module, source)
        components[name], weights[name] = module, source
    pipe = _assemble(folder, index, family, components, ())
    return PipelineSource(pipe, family, provenance, weights)
