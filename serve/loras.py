"""The server's LoRA folder (``enginekit serve ... --lora-dir DIR``): clients name LoRA files by
their name in the folder (``/v1/generate``'s ``"loras": {"ink": 0.8}``, A1111 prompts'
``<lora:ink:0.8>``), never by path; ``GET /sdapi/v1/loras`` lists them as A1111 does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from enginekit.serve.errors import ApiError

__all__ = ["folder_loras", "resolve_loras", "take_prompt_tags", "list_loras"]

#: A1111's extra-network tag for LoRA: ``<lora:NAME>``, ``<lora:NAME:WEIGHT>`` (a third field, the
#: UNet's own multiplier in A1111, is read as the weight only when the second is absent).
_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::([^:>]*))?>")


def folder_loras(folder: str | Path | None) -> dict[str, Path]:
    """name (file stem) -> path of each ``.safetensors`` file under ``folder`` (subfolders too;
    the first by sorted path wins a name), read at each request so new files show up."""
    if folder is None:
        return {}
    out: dict[str, Path] = {}
    for path in sorted(Path(folder).rglob("*.safetensors")):
        if path.is_file():
            out.setdefault(path.stem, path)
    return out


def resolve_loras(settings: Any, loras: Mapping[str, Any] | None, field: str = "loras") -> dict[str, float]:
    """A request's ``{name: scale}`` as ``{path: scale}`` from the server's folder; a 422 names
    the first unknown name (or says the server has no folder)."""
    if not loras:
        return {}
    folder = getattr(settings, "lora_dir", None)
    if folder is None:
        raise ApiError(422, f"{field}: this server applies no LoRA (start it with --lora-dir DIR)")
    known = folder_loras(folder)
    out: dict[str, float] = {}
    for name, scale in loras.items():
        path = known.get(str(name))
        if path is None:
            raise ApiError(422, f"{field}: no LoRA named {str(name)[:80]!r} in the server's folder "
                                f"(GET /sdapi/v1/loras lists them)")
        out[str(path)] = float(scale)
    return out


def take_prompt_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """A1111's ``<lora:NAME:WEIGHT>`` tags taken out of ``prompt``: the prompt without them, and
    ``{name: weight}`` (weight 1 when absent; a weight that is not a number is a 422)."""
    tags: dict[str, float] = {}

    def take(match: re.Match) -> str:
        name, first, second = match.group(1).strip(), match.group(2), match.group(3)
        text = first if first not in (None, "") else second
        try:
            weight = float(text) if text not in (None, "") else 1.0
        except ValueError:
            raise ApiError(422, f"prompt: <lora:{name[:80]}:{str(text)[:20]}> has a weight that is not a number") from None
        tags[name] = tags.get(name, 0.0) + weight
        return ""

    cleaned = _TAG.sub(take, prompt)
    return (re.sub(r"\s{2,}", " ", cleaned).strip() if tags else prompt), tags


def list_loras(settings: Any) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/loras``: A1111's shape (name, alias, path, metadata) for each file of the folder."""
    from enginekit.runtimes.lora_files import read_metadata

    out = []
    for name, path in folder_loras(getattr(settings, "lora_dir", None)).items():
        metadata = read_metadata(path)
        out.append({"name": name, "alias": metadata.get("ss_output_name") or name, "path": str(path),
                    "metadata": metadata})
    return out
