"""LoRA files read without torch: safetensors parsed with its header and numpy, the key
layouts of diffusers/PEFT and kohya (A1111) files turned into (component, module) layers.

The names follow diffusers' ``loaders/lora_conversion_utils.py`` (``_convert_non_diffusers_lora_to_diffusers``,
``_convert_unet_lora_key``, ``_convert_text_encoder_lora_key``): kohya's ``lora_unet_``,
``lora_te_``/``lora_te1_``, ``lora_te2_`` prefixes with ``lora_down``/``lora_up``/``alpha``;
diffusers' ``unet.<module>.lora_A/lora_B`` (PEFT) and the older ``.lora.down/.up`` and
``.lora_linear_layer.down/.up`` (attention-processor ``to_q_lora`` names too). A kohya name
(dots turned to underscores) is resolved against the modules the artifact's map knows, so no
guessing at where an underscore was a dot.

Pickled files (``.bin``, ``.ckpt``, ``.pt``, ``.pth``, or bytes that start as a pickle or a
zip archive does) are refused and never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from enginekit.errors import InputError

__all__ = ["LoraFile", "LoraLayer", "read_lora", "read_metadata", "addnet_hash", "kohya_names", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
#: The largest LoRA file read (a full checkpoint is not a LoRA).
MAX_BYTES = 2 << 30
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": "bf16", "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}
#: kohya's component prefixes, longest first.
_KOHYA = (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"), ("lora_te_", "text_encoder"),
          ("lora_unet_", "denoiser"), ("lora_transformer_", "denoiser"))
_DIFFUSERS = (("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"), ("unet.", "denoiser"),
              ("transformer.", "denoiser"))
#: Suffixes of the two halves and the alpha, in every format (longest first).
_ROLES = ((".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
          (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora.down.weight", "down"),
          (".lora.up.weight", "up"), (".lora_A.weight", "down"), (".lora_B.weight", "up"),
          ("_lora.down.weight", "down"), ("_lora.up.weight", "up"), (".alpha", "alpha"))
#: The attention-processor format's names for the projections (diffusers' old ``to_q_lora``).
_PROCESSOR = (("processor.to_out", "to_out.0"), ("processor.to_q", "to_q"), ("processor.to_k", "to_k"),
              ("processor.to_v", "to_v"))
_TEXT_PROCESSOR = (("self_attn.to_out", "self_attn.out_proj"), ("self_attn.to_q", "self_attn.q_proj"),
                   ("self_attn.to_k", "self_attn.k_proj"), ("self_attn.to_v", "self_attn.v_proj"))


@dataclass
class LoraLayer:
    """One low-rank update: ``down`` (rank, in[, kh, kw]), ``up`` (out, rank[, 1, 1]), ``alpha``
    (None: the rank, so the update is scaled by 1)."""

    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.down is not None else 0

    def delta(self, scale: float) -> np.ndarray:
        """``scale * alpha / rank * up @ down`` in the weight's own layout (float32)."""
        up, down = self.up.astype(np.float32), self.down.astype(np.float32)
        factor = scale * ((self.alpha / self.rank) if self.alpha is not None else 1.0)
        mat = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return (np.float32(factor) * mat).reshape(up.shape[0], *down.shape[1:])


@dataclass
class LoraFile:
    """A parsed LoRA file: its layers by component ("text_encoder", "text_encoder_2" or
    "denoiser") and raw module path (kohya's underscored, or diffusers' dotted)."""

    name: str
    sha256: str
    format: str
    layers: dict[tuple[str, str], LoraLayer] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    #: A1111's short hash of the file (its "addnet" hash: sha256 of the tensor data, 12 hex digits).
    short_hash: str = ""


def addnet_hash(data: bytes) -> str:
    """sd-webui-additional-networks' hash of a safetensors file, which A1111 prints in its
    ``Lora hashes`` field: sha256 of everything after the header."""
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(memoryview(data)[8 + n:]).hexdigest()


def _load_bytes(source: str | Path | bytes, label: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(f"LoRA {label}: pickled files are never loaded; convert it to .safetensors first")
    if not path.is_file():
        raise InputError(f"LoRA {label}: no such file")
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"LoRA {label}: a LoRA must be a .safetensors file")
    if path.stat().st_size > MAX_BYTES:
        raise InputError(f"LoRA {label}: {path.stat().st_size >> 20} MiB is too large for a LoRA (a checkpoint?)")
    return path.read_bytes()


def _parse(data: bytes, label: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":
        raise InputError(f"LoRA {label}: a pickled (torch.save) file; pickles are never loaded, "
                         "convert it to .safetensors first")
    if len(data) < 8:
        raise InputError(f"LoRA {label}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, 100 << 20):
        raise InputError(f"LoRA {label}: not a safetensors file (header length {n})")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as exc:
        raise InputError(f"LoRA {label}: not a safetensors file (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise InputError(f"LoRA {label}: not a safetensors file")
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    tensors: dict[str, np.ndarray] = {}
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = _DTYPES.get(info["dtype"]), tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"LoRA {label}: tensor {key!r} has a malformed header entry") from None
        if dtype is None:
            raise InputError(f"LoRA {label}: tensor {key!r} is {info['dtype']}, which a LoRA file does not hold")
        width = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
        if not 0 <= start <= end <= len(body) or end - start != width * int(np.prod(shape, dtype=np.int64)):
            raise InputError(f"LoRA {label}: tensor {key!r} lies outside the file (truncated?)")
        raw = np.frombuffer(body[start:end], dtype=np.uint16 if dtype == "bf16" else dtype)
        if dtype == "bf16":  # numpy has no bfloat16: its bits are the top half of a float32's
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = raw.reshape(shape)
    return tensors, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _split(key: str) -> tuple[str, str, str] | None:
    """(component, module path, role) of one key, or None for keys that are not LoRA halves."""
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            break
    else:
        return None
    for prefix, component in _KOHYA:
        if module.startswith(prefix):
            return component, module[len(prefix):], role
    for prefix, component in _DIFFUSERS:
        if module.startswith(prefix):
            module = module[len(prefix):]
            table = _TEXT_PROCESSOR if component.startswith("text_encoder") else _PROCESSOR
            for old, new in table:
                module = module.replace(old, new) if module.endswith(old) else module
            return component, module, role
    return "denoiser", module, role  # diffusers' own files may leave the UNet's prefix out


def read_lora(source: str | Path | bytes, label: str | None = None) -> LoraFile:
    """Read and parse one LoRA file (a path or its bytes); one-line :class:`InputError` for
    anything that is not a safetensors LoRA."""
    label = label or (str(source) if not isinstance(source, (bytes, bytearray, memoryview)) else "(bytes)")
    data = _load_bytes(source, label)
    tensors, meta = _parse(data, label)
    layers: dict[tuple[str, str], LoraLayer] = {}
    for key, value in tensors.items():
        split = _split(key)
        if split is None:
            continue
        component, module, role = split
        layer = layers.setdefault((component, module), LoraLayer())
        if role == "alpha":
            layer.alpha = float(np.asarray(value, dtype=np.float64).reshape(-1)[0])
        else:
            setattr(layer, role, value)
    layers = {k: v for k, v in layers.items() if v.down is not None or v.up is not None}
    if not layers:
        raise InputError(f"LoRA {label}: no LoRA tensors (no lora_A/lora_B, lora_down/lora_up or lora.down/up "
                         "keys); is it a full checkpoint or an embedding?")
    for (component, module), layer in layers.items():
        if layer.down is None or layer.up is None:
            raise InputError(f"LoRA {label}: layer {module!r} has only one of its two halves")
        if layer.down.shape[0] != layer.up.shape[1]:
            raise InputError(f"LoRA {label}: layer {module!r} has rank {layer.down.shape[0]} down but "
                             f"{layer.up.shape[1]} up")
    _peft_alphas(layers, meta)
    fmt = "kohya" if any(k.startswith(tuple(p for p, _ in _KOHYA)) for k in tensors) else "diffusers"
    name = Path(label).stem if not label.startswith("(") else label
    return LoraFile(name, hashlib.sha256(data).hexdigest(), fmt, layers, meta, addnet_hash(data)[:12])


def _peft_alphas(layers: Mapping[tuple[str, str], LoraLayer], meta: Mapping[str, str]) -> None:
    """PEFT's ``lora_alpha`` (and ``alpha_pattern``) from diffusers' ``lora_adapter_metadata``
    header entry, for the layers without an ``alpha`` tensor (diffusers' ``_load_sft_state_dict_metadata``)."""
    try:
        config = json.loads(meta.get("lora_adapter_metadata", "") or "{}")
    except ValueError:
        return
    if not isinstance(config, dict) or not config:
        return
    prefixes = {"denoiser": ("unet", "transformer"), "text_encoder": ("text_encoder",),
                "text_encoder_2": ("text_encoder_2",)}
    for (component, module), layer in layers.items():
        for prefix in prefixes.get(component, ()):
            alpha = config.get(f"{prefix}.lora_alpha")
            pattern = config.get(f"{prefix}.alpha_pattern") or {}
            hit = next((v for k, v in pattern.items() if module == k or module.endswith("." + k)), None)
            if layer.alpha is None and (hit if hit is not None else alpha) is not None:
                layer.alpha = float(hit if hit is not None else alpha)


def kohya_names(modules: Mapping[str, Any]) -> dict[str, str]:
    """kohya's underscored spelling of each module name (and of its ``text_model.`` form, which
    transformers 4 CLIP models had and kohya's names keep) -> the module name."""
    out: dict[str, str] = {}
    for name in modules:
        out[name.replace(".", "_")] = name
        out["text_model_" + name.replace(".", "_")] = name
    return out


_SGM = re.compile(r"^(input_blocks|middle_block|output_blocks)_")


def is_sgm(module: str) -> bool:
    """A kohya SDXL name in the sgm/LDM UNet's spelling (``input_blocks_4_1_...``)."""
    return bool(_SGM.match(module))


def read_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (kohya's ``ss_*`` training notes), reading its header
    only; {} for a file that has none or is not readable."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                return {}
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError):
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
