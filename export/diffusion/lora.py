"""Fuse LoRA files into a diffusion pipeline's weights before export.

diffusers does the work: ``pipe.load_lora_weights`` reads diffusers/PEFT and kohya (A1111)
files alike through its own converters, ``pipe.fuse_lora(lora_scale=...)`` merges the
low-rank update into the base weights and ``unload_lora_weights`` drops the adapter
layers, so the exported graphs are plain (no LoRA branch, no runtime cost).

What diffusers lets pass silently is refused here: a file whose keys match no module
of the pipeline (diffusers logs and moves on), and a LoRA that leaves every weight as it
was. Each fused file is recorded (name, sha256, scale, format, what it changed) for the
manifest's ``provenance.lora``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enginekit.artifact import sha256_file
from enginekit.errors import SourceError, one_line

__all__ = ["LoraSpec", "parse_lora", "fuse_loras"]

_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
#: Key prefixes that tell which family a LoRA was trained for, when it fits nothing here.
_FAMILY_HINTS = (
    (("lora_te2_", "text_encoder_2."), "SDXL"),
    (("lora_unet_double_blocks", "lora_unet_single_blocks", "lora_transformer_single_transformer_blocks",
      "transformer.single_transformer_blocks", "diffusion_model.double_blocks"), "FLUX"),
    (("lora_unet_joint_blocks", "transformer.transformer_blocks", "lora_transformer_transformer_blocks"), "SD3/FLUX"),
    (("lora_unet_", "unet.", "lora_te_", "lora_te1_", "text_encoder."), "SD 1.x/2.x/XL"),
)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and the scale it is fused at."""

    path: Path
    scale: float = 1.0


def parse_lora(text: str, default_scale: float = 1.0) -> LoraSpec:
    """``FILE.safetensors[:SCALE]`` (as ``--lora`` takes it); no scale means ``default_scale``.
    The same syntax ``generate --lora`` reads (:func:`enginekit.runtimes.tasks.lora.parse_lora_arg`)."""
    from enginekit.runtimes.tasks.lora import parse_lora_arg

    path, scale = parse_lora_arg(text, default_scale)
    return LoraSpec(Path(path), scale)


def _check_file(path: Path) -> dict[str, Any]:
    """The file's tensor names and shapes from its safetensors header; refuses anything else."""
    from safetensors import safe_open

    if not path.is_file():
        raise SourceError(f"LoRA {path}: no such file")
    if path.suffix in _PICKLE_SUFFIXES:
        raise SourceError(f"LoRA {path}: pickled files are never loaded; convert it to .safetensors first")
    if path.suffix != ".safetensors":
        raise SourceError(f"LoRA {path}: a LoRA must be a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # SafetensorError for a corrupt header, OSError for unreadable files
        raise SourceError(f"LoRA {path}: not a readable safetensors file ({one_line(exc)})") from exc
    if not keys:
        raise SourceError(f"LoRA {path}: the file holds no tensors")
    if not any("lora" in k.lower() for k in keys):
        raise SourceError(f"LoRA {path}: no LoRA tensors (no key names 'lora'); is it a full checkpoint?")
    return {"keys": keys}


def _format(keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return "kohya"
    return "diffusers"


def _hint(keys: list[str]) -> str:
    for prefixes, name in _FAMILY_HINTS:
        if any(k.startswith(prefixes) for k in keys):
            return name
    return "unknown"


#: Key prefixes of text-encoder LoRA weights (diffusers/PEFT and kohya names).
_TEXT_PREFIXES = ("text_encoder", "lora_te")


def _text_encoder_peft_problem() -> str | None:
    """Why transformers cannot take LoRA adapters here (diffusers loads text-encoder LoRAs
    through transformers' PEFT integration), or None."""
    import importlib.metadata

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # older transformers: no separate floor
        return None
    have = importlib.metadata.version("peft")
    if Version(have) < Version(MIN_PEFT_VERSION):
        tf = importlib.metadata.version("transformers")
        return f"transformers {tf} loads text-encoder LoRA weights only with peft >= {MIN_PEFT_VERSION} (peft {have} is installed)"
    return None


def _fingerprints(pipe: Any) -> dict[str, dict[str, float]]:
    """Per component, a float64 sum of |w| of every weight: enough to tell which ones a fusion moved."""
    import torch

    out: dict[str, dict[str, float]] = {}
    for name in getattr(pipe, "_lora_loadable_modules", ()):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            with torch.no_grad():
                out[name] = {k: float(p.detach().abs().sum(dtype=torch.float64)) for k, p in module.named_parameters()}
    return out


def fuse_loras(pipe: Any, family: str, loras: tuple[LoraSpec, ...] | list[LoraSpec]) -> list[dict[str, Any]]:
    """Fuse each LoRA into ``pipe`` in turn (at its scale) and return what to record for each.

    Raises :class:`SourceError` naming the file for a missing or non-safetensors file, a LoRA
    that does not fit this pipeline (another family's keys or shapes) and one that changes nothing.
    """
    try:
        import peft  # noqa: F401  (diffusers' LoRA loading needs the PEFT backend)
    except ImportError as exc:
        raise SourceError("--lora needs peft: pip install 'enginekit[export]'") from exc
    records: list[dict[str, Any]] = []
    for i, spec in enumerate(loras):
        header = _check_file(spec.path)
        name = f"enginekit_lora_{i}"
        before = _fingerprints(pipe)
        fmt = _format(header["keys"])
        text_keys = [k for k in header["keys"] if k.startswith(_TEXT_PREFIXES)]
        problem = _text_encoder_peft_problem() if text_keys else None
        if problem:
            raise SourceError(f"LoRA {spec.path}: {len(text_keys)} of its tensors are text-encoder weights, and "
                              f"{problem}; upgrade peft, or use a LoRA of the {_denoiser_title(family)} only")
        try:
            with _quiet_diffusers():
                pipe.load_lora_weights(str(spec.path), adapter_name=name)
        except Exception as exc:  # shape mismatches, unknown layouts: diffusers/peft raise many kinds
            raise SourceError(
                f"LoRA {spec.path}: does not fit this {family} pipeline ({one_line(exc)}); "
                f"its keys look like a {_hint(header['keys'])} LoRA"
            ) from exc
        loaded = [comp for comp, names in pipe.get_list_adapters().items() if name in names]
        if not loaded:
            _unload(pipe)
            raise SourceError(
                f"LoRA {spec.path}: none of its {len(header['keys'])} keys matches a module of this {family} "
                f"pipeline (they look like a {_hint(header['keys'])} LoRA); nothing would be fused"
            )
        pipe.fuse_lora(components=loaded, lora_scale=spec.scale, adapter_names=[name])
        _unload(pipe)
        after = _fingerprints(pipe)
        changed = {comp: sum(1 for k, v in after[comp].items() if before.get(comp, {}).get(k) != v) for comp in after}
        changed = {comp: n for comp, n in changed.items() if n}
        if not changed:
            raise SourceError(
                f"LoRA {spec.path}: fusing it at scale {spec.scale} changed no weight of the pipeline "
                "(its up-projections are zero, or the scale is 0); refusing to export an unchanged model"
            )
        records.append({"file": spec.path.name, "sha256": sha256_file(spec.path), "scale": spec.scale,
                        "format": fmt, "components": sorted(loaded), "weights_changed": changed})
    return records


def _unload(pipe: Any) -> None:
    pipe.unload_lora_weights()


class _quiet_diffusers:
    """diffusers logs each unmatched key at warning level; the caller reports the outcome itself."""

    def __enter__(self) -> None:
        self._logger = logging.getLogger("diffusers")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self._logger.setLevel(self._level)


def _denoiser_title(family: str) -> str:
    from enginekit.export.diffusion.families import get_family

    return "UNet" if get_family(family).denoiser == "unet" else get_family(family).denoiser
