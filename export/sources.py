"""Model sources for export: a timm name, a local folder, a hub id, or the built-in default.

Every source resolves to a :class:`SourceModel`: the PyTorch module in eval
mode, its preprocessing as the source library defines it, its label names and
where it came from. Weights are never unpickled: folders must hold
``model.safetensors``; timm's own loaders use ``weights_only=True``.

Specs understood by :func:`resolve_source`:

``default``
    the built-in digits ViT shipped in ``enginekit/models/digits-vit``.
``timm:NAME``
    a timm architecture; pretrained weights from the hub, or seeded random
    weights with ``random_weights=True``, or a safetensors file via ``weights``.
a folder
    timm's hub format (``config.json`` with ``architecture`` +
    ``model.safetensors``, as ``timm.models.save_for_hf`` writes it) or
    transformers' ``save_pretrained`` format for ``ViTForImageClassification``.
``org/name`` or ``hf-hub:org/name[@revision]``
    a Hugging Face Hub repository, fetched into the hub cache (honours
    ``HF_HUB_OFFLINE``) and then loaded as a folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enginekit.artifact import sha256_file
from enginekit.errors import SourceError, one_line
from enginekit.export.json_files import read_json
from enginekit.runtimes.preprocess import Preprocessing

__all__ = ["SourceModel", "is_timm_vit", "resolve_source", "source_for_manifest", "timm_family"]

_WEIGHTS = "model.safetensors"
_PICKLES = ("pytorch_model.bin", "model.pth", "model.pt", "pytorch_model.pth")


@dataclass
class SourceModel:
    """A PyTorch classifier ready to export, with what the manifest must record."""

    model: Any  # torch.nn.Module, in eval mode
    library: str  # "timm" | "transformers"
    architecture: str
    preprocessing: Preprocessing
    labels: tuple[str, ...] | None
    provenance: dict[str, Any] = field(default_factory=dict)
    #: The manifest's ``family``: ``vit`` for ViTs, else the timm module the architecture
    #: lives in (``resnet``, ``convnext``, ...).
    family: str = "vit"


def resolve_source(
    spec: str,
    *,
    random_weights: bool = False,
    seed: int = 0,
    weights: str | Path | None = None,
    revision: str | None = None,
) -> SourceModel:
    """Load the model named by ``spec`` (see the module docstring for the forms)."""
    if spec == "default":
        from enginekit.models.digits import DEFAULT_MODEL_DIR

        src = _load_folder(DEFAULT_MODEL_DIR)
        src.provenance["source"] = "default"
        return src
    if spec.startswith("timm:"):
        return _load_timm_name(spec[len("timm:") :], random_weights=random_weights, seed=seed, weights=weights)
    if random_weights or weights is not None:
        raise SourceError("--random-weights and --weights apply to 'timm:NAME' sources only")
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{spec}: a model source must be a folder (config.json + {_WEIGHTS}), not a file")
        return _load_folder(path)
    hub_id = spec[len("hf-hub:") :] if spec.startswith("hf-hub:") else spec
    if "@" in hub_id:
        hub_id, revision = hub_id.split("@", 1)
    if hub_id.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _load_hub(hub_id, revision)
    raise SourceError(
        f"{spec!r} is not a model source: use 'default', 'timm:NAME', a local folder, or a hub id 'org/name'"
    )


def _load_timm_name(name: str, *, random_weights: bool, seed: int, weights: str | Path | None) -> SourceModel:
    import timm
    import torch

    from enginekit.export.preprocessing import from_timm

    if not timm.is_model(name):
        raise SourceError(f"timm has no model named {name!r}; list them with timm.list_models('{name[:6]}*')")
    provenance: dict[str, Any] = {"source": f"timm:{name}", "library": "timm", "timm_version": timm.__version__}
    if random_weights and weights is not None:
        raise SourceError("pass either --random-weights or --weights, not both")
    if random_weights:
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False)
        provenance.update(weights="random", seed=seed)
    elif weights is not None:
        wpath = Path(weights)
        if wpath.suffix != ".safetensors" or not wpath.is_file():
            raise SourceError(f"{weights}: --weights must be an existing .safetensors file (weights are never unpickled)")
        from safetensors.torch import load_file

        try:
            state = load_file(str(wpath))
        except Exception as exc:  # SafetensorError (a corrupt or truncated header), OSError
            raise SourceError(f"{wpath}: not a readable safetensors file ({one_line(exc)})") from exc
        model = timm.create_model(name, pretrained=False)
        _load_state(model, state, str(wpath))
        provenance.update(weights=str(wpath.resolve()), weights_sha256=sha256_file(wpath))
    else:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:  # hub errors, offline errors, missing weights
            raise SourceError(
                f"could not fetch pretrained weights for timm:{name} ({type(exc).__name__}: {one_line(exc)}); "
                "offline, pass --random-weights to build the architecture with seeded weights"
            ) from exc
        provenance.update(weights="pretrained", hub_id=model.pretrained_cfg.get("hf_hub_id"))
    model.eval()
    labels = model.pretrained_cfg.get("label_names")
    return SourceModel(model, "timm", name, from_timm(model), _labels(labels, model.num_classes), provenance,
                       family=timm_family(model))


#: timm modules whose models are plain ViTs (what the ``vit`` family and its fusions mean).
_VIT_MODULES = {"vision_transformer", "deit"}


def is_timm_vit(model: Any) -> bool:
    """Whether a timm model is a plain ViT (the ``vit`` family)."""
    return type(model).__module__.rsplit(".", 1)[-1] in _VIT_MODULES


def timm_family(model: Any) -> str:
    """``vit`` for timm's ViTs, else the name of the timm module defining the model
    (``resnet``, ``convnext``, ``efficientnet``, ...)."""
    return "vit" if is_timm_vit(model) else type(model).__module__.rsplit(".", 1)[-1]


def _load_state(model: Any, state: dict, where: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SourceError(f"{where}: weights do not fit the architecture ({one_line(exc)})") from exc


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SourceError(f"{path}: no config.json (expected timm's hub format or transformers' save_pretrained)")
    return read_json(cfg_path)


def _require_safetensors(path: Path) -> Path:
    weights = path / _WEIGHTS
    if weights.is_file():
        return weights
    pickled = [p for p in _PICKLES if (path / p).exists()]
    if pickled:
        raise SourceError(
            f"{path}: only pickled weights ({', '.join(pickled)}); enginekit never unpickles — "
            f"convert them to {_WEIGHTS} (safetensors.torch.save_file)"
        )
    raise SourceError(f"{path}: no {_WEIGHTS}")


def _load_folder(path: Path) -> SourceModel:
    cfg = _read_config(path)
    weights = _require_safetensors(path)
    provenance = {"source": str(path.resolve()), "weights_sha256": sha256_file(weights)}
    if "architecture" in cfg:
        src = _load_timm_folder(path, cfg)
    elif cfg.get("model_type") == "vit":
        src = _load_transformers_folder(path, cfg)
    else:
        raise SourceError(
            f"{path}: config.json is neither timm's hub format ('architecture') nor a transformers ViT "
            f"(model_type {cfg.get('model_type')!r})"
        )
    src.provenance = {**provenance, **src.provenance}
    return src


def _load_timm_folder(path: Path, cfg: dict[str, Any]) -> SourceModel:
    import timm

    from enginekit.export.preprocessing import from_timm

    try:
        # timm's own local-folder loader: prefers model.safetensors, weights_only otherwise.
        model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True)
    except Exception as exc:
        raise SourceError(f"{path}: timm could not build {cfg['architecture']!r} ({one_line(exc)})") from exc
    model.eval()
    labels = cfg.get("label_names") or model.pretrained_cfg.get("label_names")
    provenance = {"library": "timm", "timm_version": timm.__version__, "weights": "local"}
    return SourceModel(model, "timm", cfg["architecture"], from_timm(model), _labels(labels, model.num_classes),
                       provenance, family=timm_family(model))


def _load_transformers_folder(path: Path, cfg: dict[str, Any]) -> SourceModel:
    import transformers

    from enginekit.export.preprocessing import config_backend, from_transformers_config

    archs = cfg.get("architectures") or []
    if "ViTForImageClassification" not in archs:
        raise SourceError(f"{path}: only ViTForImageClassification is supported, config lists {archs or 'none'}")
    proc_path = path / "preprocessor_config.json"
    if not proc_path.is_file():
        raise SourceError(
            f"{path}: no preprocessor_config.json; save the image processor beside the model "
            "(processor.save_pretrained(folder)) so preprocessing can be recorded"
        )
    try:
        proc_config = read_json(proc_path)
        preprocessing = from_transformers_config(proc_config)
        model = transformers.ViTForImageClassification.from_pretrained(str(path), use_safetensors=True)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{path}: transformers could not load the model ({one_line(exc)})") from exc
    model.eval()
    id2label = model.config.id2label or {}
    labels = [id2label[i] for i in sorted(id2label)] if id2label else None
    provenance = {"library": "transformers", "transformers_version": transformers.__version__, "weights": "local",
                  # which processor the recorded preprocessing follows, bit for bit
                  "image_processor": {"type": proc_config.get("image_processor_type") or "ViTImageProcessor",
                                      "backend": preprocessing.resize_kernel if preprocessing.resize != "none"
                                      else config_backend(proc_config)}}
    return SourceModel(
        model, "transformers", "ViTForImageClassification", preprocessing, _labels(labels, model.config.num_labels), provenance
    )


def _load_hub(hub_id: str, revision: str | None) -> SourceModel:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - part of the export extra
        raise SourceError("hub ids need huggingface_hub: pip install 'enginekit[export]'") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        folder = snapshot_download(
            hub_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.md"],
            local_files_only=offline,
        )
    except Exception as exc:
        hint = " (HF_HUB_OFFLINE is set and it is not in the hub cache)" if offline else ""
        raise SourceError(f"could not fetch {hub_id!r} from the hub{hint}: {one_line(exc)}") from exc
    src = _load_folder(Path(folder))
    src.provenance.update(source=f"hf-hub:{hub_id}", hub_id=hub_id, revision=Path(folder).name)
    return src


def _labels(labels: Any, num_classes: int) -> tuple[str, ...] | None:
    if not labels:
        return None
    labels = tuple(str(x) for x in labels)
    if len(labels) != num_classes:
        raise SourceError(f"the model has {num_classes} classes but {len(labels)} label names")
    return labels


def source_for_manifest(provenance: dict[str, Any]) -> SourceModel:
    """Rebuild the PyTorch model an artifact was exported from, from its manifest's provenance.

    Seeded random timm weights are rebuilt with their seed; local weights must
    still be where they were and hash the same (a changed file is an error, not
    a silently different baseline); hub ids load through the hub cache.
    """
    spec = provenance.get("source")
    if not spec:
        raise SourceError("the artifact's manifest records no source model (provenance.source)")
    spec = str(spec)
    weights = provenance.get("weights")
    if spec.startswith("timm:"):
        if weights == "random":
            src = resolve_source(spec, random_weights=True, seed=int(provenance.get("seed") or 0))
        elif weights not in (None, "pretrained", "local"):
            src = resolve_source(spec, weights=str(weights))
        else:
            src = resolve_source(spec)
    elif spec.startswith("hf-hub:"):
        src = resolve_source(spec[len("hf-hub:") :], revision=provenance.get("revision"))
    else:
        src = resolve_source(spec)
    recorded = provenance.get("weights_sha256")
    if recorded and src.provenance.get("weights_sha256") not in (None, recorded):
        raise SourceError(f"{spec}: the weights changed since the artifact was exported "
                          f"(sha256 {src.provenance['weights_sha256'][:12]}…, the manifest says {recorded[:12]}…)")
    return src
