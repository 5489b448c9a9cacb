"""Record, at export, where each Linear and Conv weight of the LoRA-able components landed in
the ONNX graph (``lora_map.json``, see :mod:`enginekit.runtimes.lora_map`): what lets the
torch-free runtime apply LoRA files per call without a new export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from enginekit.runtimes.lora_map import MAP_FILE, MAP_VERSION, match_weights, onnx_tensors

__all__ = ["LORA_COMPONENTS", "component_map", "write_map"]

#: The components LoRA files patch: the text encoders and the denoiser (T5 encoders are left out:
#: no LoRA trainer targets them).
LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "transformer")


def component_map(module: Any, onnx_path: Path) -> dict[str, Any]:
    """Each Linear / Conv2d weight of ``module`` (a diffusers or transformers model), by module
    name, matched by value against the exported graph's initializers."""
    import torch

    weights = {name: m.weight.detach().float().numpy() for name, m in module.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight is not None}
    found, missing = match_weights(weights, onnx_tensors(onnx_path))
    return {"modules": found, "unmatched": missing}


def write_map(root: Path, maps: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Write ``lora_map.json`` under ``root`` (None: no component to map); its relative path."""
    if not maps:
        return None
    data = {"version": MAP_VERSION, "components": {name: m["modules"] for name, m in maps.items()},
            "unmatched": {name: m["unmatched"] for name, m in maps.items() if m["unmatched"]}}
    (root / MAP_FILE).write_text(json.dumps(data, sort_keys=True) + "\n", encoding="utf-8")
    return MAP_FILE
