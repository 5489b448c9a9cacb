"""The exported classifier's attention is the plain MatMul -> Softmax -> MatMul that OpenVINO and
ONNX Runtime fuse: no all-True mask (transformers builds one only while ``torch.export`` traces)
and so no ``Where``/``IsNaN`` guards around the softmax."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest


@pytest.mark.parametrize("source", ["timm", "hf"])
def test_attention_exports_without_mask_guards(exported: dict[str, Path], source: str) -> None:
    import onnx

    from enginekit.manifest import read_manifest

    model = onnx.load(str(exported[source] / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Softmax"] >= 1
    assert ops["IsNaN"] == 0 and ops["Where"] == 0, ops
    fidelity = read_manifest(exported[source]).fidelity  # the export's own check against PyTorch
    assert fidelity["logits_max_abs"] <= fidelity["budget_max_abs"] and fidelity["top1_agreement"] == 1.0


def test_the_mask_is_kept_where_a_padding_mask_is_given() -> None:
    """Only the all-True case is skipped: a real padding mask still goes to transformers' own rule."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    import torch

    from enginekit.export.vit import _no_all_true_attention_mask

    original = masking_utils._ignore_bidirectional_mask_sdpa
    with _no_all_true_attention_mask():
        patched = masking_utils._ignore_bidirectional_mask_sdpa
        assert patched(None, 16) is True
        padding = torch.tensor([[True, True, False]])
        assert patched(padding, 3) == original(padding, 3) is False
    assert masking_utils._ignore_bidirectional_mask_sdpa is original
