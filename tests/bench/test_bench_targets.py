"""The targets script's arithmetic: multiply-adds counted with attention, and the per-precision ceilings."""

from __future__ import annotations

import pytest
import torch

from benchmarks.targets import arithmetic_floor, model_macs, precision_ceilings


class _Attention(torch.nn.Module):
    """One SDPA call on fixed shapes (batch 1, 2 heads, 8 tokens, head size 4) plus a 3x5 linear."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = k = v = torch.ones(1, 2, 8, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.linear(x.mean(dim=(2, 3))), a


def test_model_macs_counts_the_attention_matmuls() -> None:
    # QK^T and AV: 2 x (1 * 2 heads * 8 * 8 * 4) = 1024; the linear: 1 * 3 * 5 = 15
    assert model_macs(_Attention(), (4, 4)) == 1024 + 15


def test_ceilings_per_precision() -> None:
    macs = 10e9
    rates = {"fp32 (pytorch)": 80e9, "fp32 (openvino)": 100e9, "bf16 (openvino)": 200e9, "int8 (openvino)": 400e9}

    def cand(name: str, precision: str, p50: float | None) -> dict:
        record = {"latency_ms": {"p50": p50}} if p50 is not None else None
        return {"candidate": {"name": name, "precision": precision}, "record": record}

    candidates = [cand("a-fp32", "fp32", 120.0), cand("b-fp32", "fp32", 110.0), cand("c-bf16", "bf16", 70.0),
                  cand("d-int8", "int8", None)]  # d failed to build: never timed
    rows = {r["precision"]: r for r in precision_ceilings(macs, rates, pytorch_ms=200.0, candidates=candidates)}
    assert set(rows) == {"fp32", "bf16", "int8"}
    assert rows["fp32"]["rate"] == 100e9  # the best backend's peak
    assert rows["fp32"]["floor_ms"] == pytest.approx(100.0)
    assert rows["fp32"]["max_speedup"] == pytest.approx(2.0)
    assert (rows["fp32"]["fastest"], rows["fp32"]["fastest_ms"]) == ("b-fp32", 110.0)
    assert rows["bf16"]["floor_ms"] == pytest.approx(arithmetic_floor(macs, 200e9)) == pytest.approx(50.0)
    assert rows["int8"]["max_speedup"] == pytest.approx(8.0)
    assert rows["int8"]["fastest"] is None
