"""What a TensorRT plan is tied to, and the checks made before one is deserialized.

A serialized plan runs only on the TensorRT version that built it and on GPUs of the same
compute capability (no ``VERSION_COMPATIBLE`` lean runtime, no hardware-compatibility level:
those embed host code or give up kernels, and enginekit asks for neither). The manifest records
the identity the build saw (:class:`PlanIdentity`); :func:`check_plan` compares it with this
machine's — read from installed package metadata and ``nvidia-smi``, never by importing
``tensorrt`` — and refuses a mismatch in one line naming both, before any plan byte is read.

Everything here is importable and testable without TensorRT, CUDA or a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from enginekit.errors import BackendError, BackendUnavailableError, DeviceError

__all__ = ["PlanIdentity", "TENSORRT_DISTRIBUTIONS", "INSTALL_HINT", "installed_tensorrt_version", "device_index",
           "local_identity", "check_plan", "missing_tensorrt", "timing_cache_path"]

#: The pip distributions that install the ``tensorrt`` Python module, first found wins.
TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings",
                          "tensorrt-cu12-bindings")
INSTALL_HINT = "pip install 'enginekit[tensorrt]' on a machine with a CUDA GPU (TensorRT 10.8+ or 11, cuda-python)"


@dataclass(frozen=True)
class PlanIdentity:
    """The TensorRT version and the GPU a plan was built with (or that this machine has)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    def to_dict(self) -> dict[str, str]:
        return {"tensorrt_version": self.tensorrt_version, "gpu_name": self.gpu_name,
                "compute_capability": self.compute_capability}

    @classmethod
    def from_target(cls, target: Mapping[str, Any]) -> PlanIdentity:
        try:
            return cls(str(target["tensorrt_version"]), str(target.get("gpu_name", "?")),
                       str(target["compute_capability"]))
        except KeyError as exc:
            raise BackendError(f"tensorrt: the manifest's target lacks {exc.args[0]!r}, so the plan cannot be "
                               "checked against this machine; compile it again") from None


def installed_tensorrt_version() -> str | None:
    """The installed TensorRT's version, from package metadata (``tensorrt`` is not imported)."""
    for dist in TENSORRT_DISTRIBUTIONS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def missing_tensorrt() -> BackendUnavailableError:
    """The one-line error for a machine without TensorRT's Python module."""
    return BackendUnavailableError(f"backend 'tensorrt' needs TensorRT, which is not installed here; {INSTALL_HINT}")


_DEVICE = re.compile(r"^(cuda|gpu)(?:[:.](\d+))?$")


def device_index(device: str) -> int:
    """``cuda`` / ``gpu`` -> 0, ``cuda:1`` / ``gpu.1`` -> 1; anything else is a :class:`DeviceError`."""
    match = _DEVICE.match(device.strip().lower())
    if match is None:
        raise DeviceError(f"tensorrt runs on CUDA GPUs: device {device!r} is not one (use cuda or cuda:N)")
    return int(match.group(2) or 0)


def local_identity(device: str) -> PlanIdentity:
    """This machine's TensorRT version and the GPU at ``device``, without importing TensorRT
    (package metadata and ``nvidia-smi``)."""
    from enginekit.hardware import fingerprint

    version = installed_tensorrt_version()
    if version is None:
        raise missing_tensorrt()
    index = device_index(device)
    gpus = fingerprint()["gpus"]
    if index >= len(gpus):
        raise DeviceError(f"tensorrt: device {device!r} is not here (nvidia-smi lists {len(gpus)} GPU"
                          f"{'s' if len(gpus) != 1 else ''}); a plan runs on a CUDA GPU")
    gpu = gpus[index]
    return PlanIdentity(version, str(gpu.get("name")), str(gpu.get("compute_capability")))


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:3])


def check_plan(path: Path | str, built: PlanIdentity, here: PlanIdentity) -> None:
    """Refuse (one line naming both) a plan built for another TensorRT version or compute capability.

    The version compared is major.minor.patch: TensorRT's serialized engines are tied to the
    exact release that wrote them. GPU names may differ (an A10 plan runs on an A10G: both are 8.6).
    """
    problems = []
    if _minor(built.tensorrt_version) != _minor(here.tensorrt_version):
        problems.append(f"TensorRT {built.tensorrt_version}, this machine has {here.tensorrt_version}")
    if built.compute_capability != here.compute_capability:
        problems.append(f"compute capability {built.compute_capability} ({built.gpu_name}), this GPU is "
                        f"{here.compute_capability} ({here.gpu_name})")
    if problems:
        raise BackendError(f"tensorrt: {path} was built for {'; and for '.join(problems)}; build the plan again "
                           "here from its ONNX (enginekit compile ONNX -b tensorrt -o OUT)")


def timing_cache_path(identity: PlanIdentity) -> Path:
    """The persisted timing cache for this TensorRT version and GPU: TensorRT's tactic timings are
    valid only there, so the key is both (``$ENGINEKIT_CACHE_DIR/tensorrt/timing/...``)."""
    from enginekit.artifact import cache_root

    gpu = re.sub(r"[^A-Za-z0-9]+", "-", identity.gpu_name).strip("-").lower() or "gpu"
    name = f"trt{identity.tensorrt_version}-{gpu}-sm{identity.compute_capability.replace('.', '')}.cache"
    return cache_root() / "tensorrt" / "timing" / name
