"""The hardware fingerprint every bench record carries.

Cheap and side-effect free: /proc/cpuinfo, psutil, ``platform``, one bounded
``nvidia-smi`` call, and package versions read from installed metadata. No
backend library is imported: a fingerprint must not pay for (or perturb) the
thing it describes.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import psutil

__all__ = ["ISA_FLAGS", "fingerprint", "fingerprint_id"]

#: CPU flags that decide which kernels the backends pick.
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)

#: Version keys and the distributions that provide them, first found wins
#: (a GPU build of ONNX Runtime installs as ``onnxruntime-gpu``).
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "openvino": ("openvino",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"),
    "torch": ("torch",),
    "timm": ("timm",),
    "transformers": ("transformers",),
    "diffusers": ("diffusers",),
    "enginekit": ("enginekit",),
}

_CPUINFO = Path("/proc/cpuinfo")
_NVIDIA_SMI_TIMEOUT_S = 5.0


def _cpuinfo() -> dict[str, str]:
    """First processor block of /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    try:
        text = _CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    return info


def _cpu_model(info: Mapping[str, str]) -> str:
    return info.get("model name") or platform.processor() or platform.machine() or "unknown"


def _flags(info: Mapping[str, str]) -> list[str]:
    present = set(info.get("flags", "").split())
    return [f for f in ISA_FLAGS if f in present]


def _gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs from nvidia-smi; [] without the binary or when it fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    cmd = [
        exe,
        "--query-gpu=name,compute_cap,driver_version,memory.total",
        "--format=csv,noheader,nounits",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    gpus = []
    for line in proc.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0]:
            continue
        name, cap, driver, mem = parts
        try:
            memory = int(float(mem.split()[0]) * 2**20)  # MiB
        except (ValueError, IndexError):
            memory = None
        gpus.append({"name": name, "compute_capability": cap, "driver": driver, "memory_bytes": memory})
    return gpus


def _versions() -> dict[str, str]:
    versions = {}
    for key, dists in _DISTRIBUTIONS.items():
        for dist in dists:
            try:
                versions[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def fingerprint() -> dict[str, Any]:
    """Describe this machine and its library versions as a JSON-ready dict.

    Keys: ``cpu_model``, ``physical_cores``, ``logical_cores``, ``flags`` (the
    :data:`ISA_FLAGS` present, [] off Linux), ``memory_bytes``, ``os``,
    ``arch``, ``python``, ``gpus`` (name, compute_capability, driver,
    memory_bytes per NVIDIA GPU) and ``versions`` (installed packages only).
    """
    info = _cpuinfo()
    return {
        "cpu_model": _cpu_model(info),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "flags": _flags(info),
        "memory_bytes": int(psutil.virtual_memory().total),
        "os": platform.platform(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "gpus": _gpus(),
        "versions": _versions(),
    }


def fingerprint_id(fp: Mapping[str, Any]) -> str:
    """A short stable hash of the hardware in ``fp`` (not the software).

    Memory is rounded to GiB because the kernel's reserve moves the exact
    total between boots; library upgrades keep the id, so records of one
    machine group together across them.
    """
    memory = fp.get("memory_bytes") or 0
    key = {
        "cpu_model": fp.get("cpu_model"),
        "logical_cores": fp.get("logical_cores"),
        "memory_gib": round(memory / 2**30),
        "gpus": [g.get("name") for g in fp.get("gpus") or []],
    }
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
