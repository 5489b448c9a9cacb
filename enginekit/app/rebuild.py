"""The ``enginekit`` commands that rebuild one of ``optimize``'s candidates by hand.

``optimize`` builds each candidate through the same library calls the CLI makes
(``export``, ``quantize``, ``compile``); :func:`rebuild_commands` writes those
calls back as command lines with the typed flags, so a pick can be rebuilt,
inspected or varied without rerunning the search.
"""

from __future__ import annotations

import json
import shlex
from typing import Any, Mapping

from enginekit.registry import backend_class, backend_names

__all__ = ["rebuild_commands", "pipeline_rebuild_commands"]

#: compile option key -> the ``compile`` flag that sets it (booleans are bare flags).
_FLAGS = {
    "static_batch": "--batch",
    "inference_precision": "--inference-precision",
    "performance_hint": "--hint",
    "num_streams": "--streams",
    "graph_optimization_level": "--graph-optimization-level",
    "transformer_fusions": "--transformer-fusions",
    "precision": "--precision",
}
#: ``quantize``'s defaults, left out of the printed command.
_QUANT_DEFAULT_CALIBRATION_SIZE = 64
_QUANT_DEFAULT_GROUP_SIZE = 128


def _q(value: Any) -> str:
    return shlex.quote(str(value))


def _export_command(model: str, source: Mapping[str, Any], seed: int, revision: str | None) -> str:
    parts = ["enginekit", "export", _q(model), "-o", "onnx"]
    weights = source.get("weights")
    if weights == "random":
        parts.append("--random-weights")
    elif weights not in (None, "pretrained", "local") and str(model).startswith("timm:"):
        parts += ["--weights", _q(weights)]
    if revision:
        parts += ["--revision", _q(revision)]
    if seed:
        parts += ["--seed", str(seed)]
    return " ".join(parts)


def rebuild_commands(report: Mapping[str, Any], candidate: Mapping[str, Any], *, group_size: int | None = None,
                     seed: int = 0, revision: str | None = None) -> list[str]:
    """The command lines that rebuild ``candidate`` (a report's ``candidates[i]["candidate"]``)
    as ``optimize`` built it: export, then quantize (where the candidate is quantized), then
    compile (where it is compiled). ``group_size`` is the int4 group size ``optimize`` used."""
    from enginekit.quant.base import get_method

    config = report.get("config") or {}
    lines = [_export_command(report["model"], report.get("source") or {}, seed, revision)]
    if candidate.get("token_merge"):
        lines[0] += f" --token-merge {int(candidate['token_merge'])}"
    built = "onnx"
    method, quant_backend = candidate.get("method"), candidate.get("quant_backend")
    compile_extra = candidate.get("compile_extra")
    if method:
        out = candidate["name"] if compile_extra is None else f"{quant_backend}-{method}-quantized"
        parts = ["enginekit", "quantize", "onnx", "-m", method,
                 *(["-b", str(quant_backend)] if quant_backend in backend_names() else ["--target", str(quant_backend)])]
        if get_method(method, quant_backend).needs_calibration:
            spec = (report.get("data") or {}).get("spec") or "photos"
            parts += ["-c", _q(spec)]
            if spec == "synthetic":
                parts.append("--allow-synthetic-calibration")
            size = int(config.get("calibration_size") or _QUANT_DEFAULT_CALIBRATION_SIZE)
            if size != _QUANT_DEFAULT_CALIBRATION_SIZE:
                parts += ["--calibration-size", str(size)]
        if method.startswith("int4") and group_size and group_size != _QUANT_DEFAULT_GROUP_SIZE:
            parts += ["--group-size", str(group_size)]
        # optimize judges every candidate against PyTorch itself, not quantize's gate
        # against the float parent: the gate is opened so the rebuild cannot differ.
        parts += ["--min-agreement", "0", "--min-cosine", "0", "-o", _q(out)]
        lines.append(" ".join(parts))
        built = out
    if compile_extra is not None:
        parts = ["enginekit", "compile", built, "-b", str(candidate["backend"]), "-o", _q(candidate["name"])]
        for key, value in compile_extra.items():
            flag = _FLAGS.get(key)
            if flag is None:
                parts += ["--option", _q(f"{key}={json.dumps(value)}")]
            elif isinstance(value, bool):
                parts += [flag] if value else []
            else:
                parts += [flag, _q(str(value).lower() if key == "performance_hint" else value)]
        if config.get("threads"):
            parts += ["--threads", str(config["threads"])]
        lines.append(" ".join(parts))
    return lines


def pipeline_rebuild_commands(report: Mapping[str, Any], candidate: Mapping[str, Any], components: list[str], *,
                              seed: int = 0, revision: str | None = None) -> list[str]:
    """The commands that rebuild a pipeline ``optimize`` candidate (a report's
    ``candidates[i]["candidate"]``): export, then ``quantize_pipeline`` where the candidate is
    quantized (a Python call: the per-component precisions are its ``components`` argument),
    then ``compile`` with the same options (OpenVINO: static shapes at the size judged)."""
    source = report.get("source") or {}
    parts = ["enginekit", "export", _q(report["model"]), "-o", "onnx"]
    if source.get("kind") == "random":
        parts.append("--random-weights")
    if source.get("without_t5"):
        parts.append("--no-t5")
    if source.get("streaming"):
        parts.append("--streaming")
    if revision:
        parts += ["--revision", _q(revision)]
    if seed:
        parts += ["--seed", str(seed)]
    lines = [" ".join(parts)]
    if candidate.get("builder"):
        return lines + [f"# {candidate['name']} was built by a custom builder ({candidate['builder']}): no commands"]
    backend, built = str(candidate["backend"]), "onnx"
    if candidate.get("how") == "quantize":
        precisions = candidate["precisions"]
        per = {c: precisions.get(c, precisions.get("*", "fp32")) for c in components}
        call = (f"from enginekit.quant.diffusion import quantize_pipeline; quantize_pipeline('onnx', 'quantized', "
                f"{candidate['method']!r}, backend={backend!r}, components={per!r}, check_fidelity=False)")
        lines.append(f"python -c {_q(call)}")
        built = "quantized"
        if not backend_class(backend).static_shapes:  # the quantized pipeline runs as it is
            return lines
    parts = ["enginekit", "compile", built, "-b", backend, "-o", _q(candidate.get("base") or candidate["name"])]
    if candidate.get("compile_precision", "fp32") != "fp32":
        parts += ["--precision", str(candidate["compile_precision"])]
    if backend_class(backend).static_shapes:  # compiled at the size optimize judged
        parts += ["--height", str(report["size"]), "--width", str(report["size"]), "--batch", "1"]
    for key, value in (candidate.get("compile_options") or {}).items():
        flag = _FLAGS.get(key)
        if flag is not None and not isinstance(value, (list, dict)):
            parts += [flag, _q(value)]
        else:
            parts += ["--option", _q(f"{key}={json.dumps(value, separators=(',', ':'))}")]
    threads = (report.get("config") or {}).get("threads")
    if threads:
        parts += ["--threads", str(threads)]
    lines.append(" ".join(parts))
    if candidate.get("cache"):
        lines.append(f"# run with step cache {candidate['cache']}: optimize wrote it as the pick's default_cache; "
                     f"elsewhere pass --cache {candidate['cache']} to generate (or cache= to the pipeline)")
    return lines
