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


# /proc/cpuinfo as 64-bit Raspberry Pi OS prints it on a Pi 4 (four identical blocks, then
# the board lines) and as L4T prints it on a Jetson AGX Orin (no board lines: the board
# name lives in the device tree). Trimmed to two processors each.
_RPI4 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

processor\t: 1
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2835
Revision\t: c03114
Serial\t\t: 100000000000000a
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
_ORIN = """processor\t: 0
model name\t: ARMv8 Processor rev 1 (v8l)
BogoMIPS\t: 62.50
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm paca pacg
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd42
CPU revision\t: 1

processor\t: 1
model name\t: ARMv8 Processor rev 1 (v8l)
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm paca pacg
CPU implementer\t: 0x41
CPU part\t: 0xd42

"""
# A big.LITTLE board (RK3588: four Cortex-A55, then four Cortex-A76), bf16/i8mm-less.
_RK3588 = _RPI4.split("Hardware")[0].replace("0xd08", "0xd05") + _RPI4.split("\n\n")[1].replace("0xd08", "0xd0b") + "\n"


def test_arm_records_carry_their_instruction_sets(tmp_path, monkeypatch) -> None:
    """Jetson and Raspberry Pi kernels name the ISA in ``Features`` and the core in
    ``CPU implementer``/``CPU part``, not in ``flags``/``model name``."""
    from enginekit import hardware

    def fp(text: str, board: str | None = None) -> dict:
        (tmp_path / "cpuinfo").write_text(text)
        model = tmp_path / "model"
        if board is None:
            model.unlink(missing_ok=True)
        else:
            model.write_bytes(board.encode() + b"\x00")
        monkeypatch.setattr(hardware, "_CPUINFO", tmp_path / "cpuinfo")
        monkeypatch.setattr(hardware, "_DEVICE_TREE_MODEL", model)
        return hardware.fingerprint()

    pi = fp(_RPI4)
    assert pi["flags"] == ["asimd"]
    assert pi["cpu_model"] == "ARM Cortex-A72 (Raspberry Pi 4 Model B Rev 1.4)"
    assert pi["cpu_implementer"] == "0x41" and pi["cpu_parts"] == ["0xd08"]
    orin = fp(_ORIN, board="NVIDIA Jetson AGX Orin Developer Kit")
    assert {"asimd", "fphp", "asimdhp", "asimddp"} == set(orin["flags"])
    assert orin["cpu_model"] == "ARMv8 Processor rev 1 (v8l) (NVIDIA Jetson AGX Orin Developer Kit)"
    assert orin["cpu_parts"] == ["0xd42"]
    assert fp(_ORIN)["cpu_model"] == "ARMv8 Processor rev 1 (v8l)"  # no device tree: no board
    rk = fp(_RK3588)
    assert rk["cpu_model"] == "ARM Cortex-A55 + Cortex-A76" and rk["cpu_parts"] == ["0xd05", "0xd0b"]
    # the id tells the boards apart, and records still serialize
    assert len({hardware.fingerprint_id(r) for r in (pi, orin, rk)}) == 3
    json.dumps(orin)
    # an x86 record keeps its shape: no ARM keys
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: avx2 fma\n\n")
    x86 = hardware.fingerprint()
    assert x86["cpu_model"] == "AMD EPYC" and "cpu_implementer" not in x86 and x86["flags"] == ["avx2", "fma"]
