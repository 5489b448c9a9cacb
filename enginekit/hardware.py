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

__all__ = ["ARM_ISA_FLAGS", "ISA_FLAGS", "X86_ISA_FLAGS", "fingerprint", "fingerprint_id", "gpu_stack"]

#: x86 CPU flags that decide which kernels the backends pick (/proc/cpuinfo ``flags``).
X86_ISA_FLAGS = (
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
#: The same for ARM (/proc/cpuinfo ``Features``): NEON (``asimd``, ``neon`` on 32-bit),
#: fp16 arithmetic, int8 dot products and matrix multiply, bf16, SVE and SME.
ARM_ISA_FLAGS = (
    "neon",
    "asimd",
    "fphp",
    "asimdhp",
    "asimddp",
    "asimdfhm",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
    "sme",
)
ISA_FLAGS = X86_ISA_FLAGS + ARM_ISA_FLAGS

#: ARM's ``CPU implementer`` and ``CPU part`` codes of the cores edge boxes carry
#: (Raspberry Pi 3/4/5, Jetson Nano/Xavier/Orin, Graviton, Ampere), from the Linux kernel's cputype.h.
_ARM_IMPLEMENTERS = {"0x41": "ARM", "0x42": "Broadcom", "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x61": "Apple",
                     "0xc0": "Ampere"}
_ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd04"): "Cortex-A35", ("0x41", "0xd05"): "Cortex-A55",
    ("0x41", "0xd07"): "Cortex-A57", ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd09"): "Cortex-A73",
    ("0x41", "0xd0a"): "Cortex-A75", ("0x41", "0xd0b"): "Cortex-A76", ("0x41", "0xd0c"): "Neoverse-N1",
    ("0x41", "0xd0d"): "Cortex-A77", ("0x41", "0xd40"): "Neoverse-V1", ("0x41", "0xd41"): "Cortex-A78",
    ("0x41", "0xd42"): "Cortex-A78AE", ("0x41", "0xd44"): "Cortex-X1", ("0x41", "0xd46"): "Cortex-A510",
    ("0x41", "0xd47"): "Cortex-A710", ("0x41", "0xd48"): "Cortex-X2", ("0x41", "0xd49"): "Neoverse-N2",
    ("0x41", "0xd4f"): "Neoverse-V2", ("0x41", "0xd80"): "Cortex-A520", ("0x41", "0xd81"): "Cortex-A720",
    ("0x4e", "0x004"): "Carmel", ("0xc0", "0xac3"): "Ampere-1",
}  # fmt: skip

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
#: The board name on ARM boards (Jetson, Raspberry Pi), NUL-terminated.
_DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
_NVIDIA_SMI_TIMEOUT_S = 5.0


def _cpuinfo() -> dict[str, str]:
    """The first processor block of /proc/cpuinfo, plus the machine-wide lines ARM kernels
    put after the last block (``Hardware``, ``Model``) and, as ``CPU parts``, every
    distinct ``CPU part`` (big.LITTLE chips have two); empty where there is no such file."""
    try:
        text = _CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    parts: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        info.setdefault(key, value)
        if key == "CPU part" and value not in parts:
            parts.append(value)
    if parts:
        info["CPU parts"] = " ".join(parts)
    return info


def _board() -> str | None:
    try:
        text = _DEVICE_TREE_MODEL.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    return text.strip("\x00 \n") or None


def _arm_cpu(info: Mapping[str, str]) -> str | None:
    """``ARM Cortex-A76`` (or ``ARM Cortex-A76 + Cortex-A55``) from ARM's implementer and part codes."""
    implementer = info.get("CPU implementer", "").lower()
    if not implementer:
        return None
    names = [_ARM_PARTS.get((implementer, part.lower()), f"part {part}") for part in info.get("CPU parts", "").split()]
    vendor = _ARM_IMPLEMENTERS.get(implementer, f"implementer {implementer}")
    return f"{vendor} {' + '.join(names)}".strip()


def _cpu_model(info: Mapping[str, str]) -> str:
    arm = _arm_cpu(info)
    name = info.get("model name") or arm or platform.processor() or platform.machine() or "unknown"
    board = info.get("Model") or (_board() if arm else None)
    return f"{name} ({board})" if board and board not in name else name


def _flags(info: Mapping[str, str]) -> list[str]:
    present = set((info.get("flags") or info.get("Features") or "").split())
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
    :data:`ISA_FLAGS` present, [] off Linux; on ARM read from ``Features``), on ARM
    ``cpu_implementer`` and ``cpu_parts`` (the codes), ``memory_bytes``, ``os``,
    ``arch``, ``python``, ``gpus`` (name, compute_capability, driver,
    memory_bytes per NVIDIA GPU) and ``versions`` (installed packages only).
    """
    info = _cpuinfo()
    arm = {"cpu_implementer": info["CPU implementer"], "cpu_parts": info.get("CPU parts", "").split()} \
        if "CPU implementer" in info else {}
    return {
        "cpu_model": _cpu_model(info),
        **arm,
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


def _cuda_driver_version() -> tuple[int | None, str | None]:
    """The CUDA version the installed driver supports (12080 for 12.8) via ``libcuda``'s
    ``cuDriverGetVersion``, or (None, why not)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None, "libcuda.so.1 is not loadable: no NVIDIA driver on this machine"
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None, "cuDriverGetVersion failed"
    return version.value, None


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def gpu_stack() -> list[dict[str, Any]]:
    """What the GPU path needs, one row each (``name``, ``usable``, ``detail``: the version, or
    why it is unusable): the GPU, its driver, CUDA, cuda-python and TensorRT. No library is
    imported; ``nvidia-smi``, ``libcuda`` and package metadata only."""
    gpus = _gpus()
    versions = _versions()
    rows: list[dict[str, Any]] = []
    smi = shutil.which("nvidia-smi") is not None
    rows.append({"name": "gpu", "usable": bool(gpus), "detail": "; ".join(
        f"{g['name']} (compute capability {g['compute_capability']})" for g in gpus) or (
        "nvidia-smi lists no GPU" if smi else "nvidia-smi not found: no NVIDIA GPU or driver")})
    rows.append({"name": "driver", "usable": bool(gpus), "detail": gpus[0]["driver"] if gpus else "none"})
    cuda, why = _cuda_driver_version()
    rows.append({"name": "cuda", "usable": cuda is not None,
                 "detail": f"driver supports CUDA {_cuda_text(cuda)}" if cuda is not None else why})
    bindings = next((v for d in ("cuda-bindings", "cuda-python") if (v := _dist_version(d))), None)
    rows.append({"name": "cuda-python", "usable": bindings is not None and cuda is not None,
                 "detail": (bindings + ("" if cuda is not None else " (no driver to run it)")) if bindings
                 else "not installed: pip install 'cuda-python>=12.6'"})
    trt = versions.get("tensorrt")
    rows.append({"name": "tensorrt", "usable": trt is not None and bool(gpus),
                 "detail": (trt + ("" if gpus else " (no CUDA GPU to build or run plans)")) if trt
                 else "not installed: pip install 'enginekit[tensorrt]' on a machine with a CUDA GPU"})
    return rows


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
