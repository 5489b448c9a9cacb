"""ONNX Runtime's execution providers for a device and an asked provider, as ``InferenceSession`` takes them.

``-d cpu`` runs ``CPUExecutionProvider``; ``-d cuda`` runs ``CUDAExecutionProvider`` (an
``onnxruntime-gpu`` install); ``-d cuda --provider tensorrt`` puts ORT's TensorRT execution
provider in front of CUDA (ORT sends TensorRT the subgraphs it can build and runs the rest on
CUDA, which is how ORT documents it), with its engine and timing caches on so the second load
of an artifact skips the build: ``$ENGINEKIT_CACHE_DIR/onnxruntime-trt/<digest16>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enginekit.errors import DeviceError

__all__ = ["PROVIDERS", "DEVICE_ALIASES", "device_kind", "provider_chain", "trt_cache_dir"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
#: Device spellings other tools use for the same device.
DEVICE_ALIASES = {"gpu": "cuda"}


def device_kind(device: str) -> tuple[str, int]:
    """``cuda:1`` / ``gpu.1`` -> ("cuda", 1); ``cpu`` -> ("cpu", 0)."""
    text = device.lower().replace(".", ":")
    kind, _, index = text.partition(":")
    kind = DEVICE_ALIASES.get(kind, kind)
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise DeviceError(f"onnxruntime: unknown device {device!r}; use one of: cpu, cuda (cuda:N for a GPU by index)")
    return kind, int(index or 0)


def trt_cache_dir(digest: str) -> Path:
    """Where ORT's TensorRT provider keeps the engines it built for one artifact (not created here)."""
    from enginekit.artifact import cache_root

    return cache_root() / "onnxruntime-trt" / digest[:16]


def provider_chain(device: str, provider: str, available: list[str], cache: Path | None = None,
                   fp16: bool = False) -> list[Any]:
    """The ``providers=`` list for ``device`` and ``provider`` ("" = the device's own), checked
    against ORT's ``available`` providers: a missing one is a one-line :class:`DeviceError`
    naming the wheel that brings it, never a quiet run on the CPU."""
    kind, index = device_kind(device)
    provider = provider or kind
    if provider not in PROVIDERS:
        raise DeviceError(f"onnxruntime: unknown provider {provider!r}; use one of: {', '.join(PROVIDERS)}")
    if kind == "cpu" and provider != "cpu":
        raise DeviceError(f"onnxruntime: provider {provider!r} runs on a GPU; give -d cuda")
    if kind == "cuda" and provider == "cpu":
        raise DeviceError("onnxruntime: -d cuda with provider 'cpu' disagree; give one")
    needed = [PROVIDERS[provider]] + ([PROVIDERS["cuda"]] if provider == "tensorrt" else [])
    missing = [p for p in needed if p not in available]
    if missing:
        wheel = "onnxruntime-gpu with TensorRT's libraries (pip install tensorrt)" if "Tensorrt" in missing[0] \
            else "onnxruntime-gpu"
        raise DeviceError(f"onnxruntime: {missing[0]} is not in this onnxruntime (it has: {', '.join(available)}); "
                          f"install {wheel}")
    if provider == "cpu":
        return [PROVIDERS["cpu"]]
    if provider == "cuda":
        return [(PROVIDERS["cuda"], {"device_id": index})]
    options: dict[str, Any] = {"device_id": index, "trt_fp16_enable": fp16}
    if cache is not None:
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache),
                       trt_timing_cache_enable=True, trt_timing_cache_path=str(cache))
    return [(PROVIDERS["tensorrt"], options), (PROVIDERS["cuda"], {"device_id": index})]
