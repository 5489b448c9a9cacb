"""Hardware fingerprint: shape of the record, stable id, no heavy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

from enginekit.hardware import ISA_FLAGS, fingerprint, fingerprint_id

KEYS = {
    "cpu_model",
    "physical_cores",
    "logical_cores",
    "flags",
    "memory_bytes",
    "os",
    "arch",
    "python",
    "gpus",
    "versions",
}


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def test_fingerprint_has_the_keys() -> None:
    fp = fingerprint()
    assert KEYS <= set(fp)
    assert isinstance(fp["cpu_model"], str) and fp["cpu_model"]
    assert isinstance(fp["flags"], list)
    assert set(fp["flags"]) <= set(ISA_FLAGS)
    assert fp["logical_cores"] >= 1
    assert fp["memory_bytes"] > 0
    assert isinstance(fp["gpus"], list)
    json.dumps(fp)  # a bench record must serialize as is


def test_versions_list_installed_packages_only() -> None:
    versions = fingerprint()["versions"]
    assert versions["numpy"] == metadata.version("numpy")
    assert "enginekit" in versions
    for key, dists in {"tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"), "diffusers": ("diffusers",)}.items():
        if not any(_installed(d) for d in dists):
            assert key not in versions


def test_fingerprint_id_is_stable_and_hardware_only() -> None:
    a, b = fingerprint(), fingerprint()
    assert fingerprint_id(a) == fingerprint_id(b)
    assert len(fingerprint_id(a)) == 12
    newer = {**a, "versions": {**a["versions"], "numpy": "99.0"}, "python": "3.99.0"}
    assert fingerprint_id(newer) == fingerprint_id(a)
    other = {**a, "cpu_model": a["cpu_model"] + " (other)"}
    assert fingerprint_id(other) != fingerprint_id(a)


def test_no_backend_imports() -> None:
    code = (
        "import sys, enginekit.hardware as h; h.fingerprint(); "
        "print([m for m in ('onnxruntime', 'openvino', 'torch', 'tensorrt') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_flags_name_every_reduced_precision_unit(tmp_path, monkeypatch) -> None:
    """A Zen 4 computes bf16 through AVX512-BF16 without AMX; optimize plans its bf16
    candidates from these flags, so the fingerprint must carry them."""
    from enginekit import hardware
    from enginekit.app.optimize import plan_candidates

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\n"
                       "flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512_bf16 avx512_vnni\n\n")
    monkeypatch.setattr(hardware, "_CPUINFO", cpuinfo)
    flags = hardware.fingerprint()["flags"]
    assert {"avx512_bf16", "avx512_vnni", "avx2"} <= set(flags)
    assert "amx_bf16" not in flags
    names = [c.name for c in plan_candidates(["openvino"], ["fp32", "fp16", "int8"], 1, cpu_flags=flags)]
    assert "openvino-bf16" in names
