"""The PyTorch side of explanations: a ViT's attention layout and probabilities, and the export's
check that the engine's attention rollout is PyTorch's.

The export records how the engine's tokens lie on the image (``manifest.extra["attention"]``:
prefix tokens, patch grid, whose row rollout reads) and checks, on the parity inputs, the
attention probabilities ONNX Runtime computes in the tapped graph
(:mod:`enginekit.runtimes.attention_taps`) and the rollout over them against PyTorch's own
probabilities (timm with its fused attention turned off, transformers with eager attention).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from enginekit.errors import FidelityError

__all__ = ["attention_layout", "torch_attentions", "check_rollout", "ROLLOUT_ATOL"]

#: Budget of the engine's rollout and attention probabilities against PyTorch's (both are in [0, 1]).
ROLLOUT_ATOL = 1e-4


def attention_layout(src: Any, size: tuple[int, int]) -> dict[str, Any] | None:
    """Where the source's tokens lie: prefix tokens, patch grid (rows, cols), query; None for a
    model that is not a plain ViT, or merges tokens (its maps come from occlusion)."""
    from enginekit.export.token_merge import is_vit

    if not is_vit(src.model, src.library) or src.provenance.get("token_merge"):
        # A token-merged ViT attends over fewer tokens in each block: no one grid to roll out on.
        return None
    model = src.model
    if src.library == "timm":
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        prefix = getattr(model, "num_prefix_tokens", None)
        if grid is None or prefix is None:
            return None
        query = "cls" if getattr(model, "global_pool", "token") == "token" and prefix else "mean"
        return {"prefix_tokens": int(prefix), "grid": [int(grid[0]), int(grid[1])], "query": query}
    patch = getattr(model.config, "patch_size", None)
    if not isinstance(patch, int) or size[0] % patch or size[1] % patch:
        return None
    return {"prefix_tokens": 1, "grid": [size[0] // patch, size[1] // patch], "query": "cls"}


@contextlib.contextmanager
def _explicit_attention(src: Any) -> Iterator[list[Any]]:
    """Run the model with its attention probabilities materialised; yields the list they land in
    (timm: its Attention modules' ``fused_attn`` off and a hook on ``attn_drop``; transformers:
    eager attention, whose probabilities ``output_attentions`` returns)."""
    captured: list[Any] = []
    if src.library == "timm":
        modules = [m for m in src.model.modules() if hasattr(m, "fused_attn") and hasattr(m, "attn_drop")]
        saved = [m.fused_attn for m in modules]
        hooks = [m.attn_drop.register_forward_hook(lambda mod, args, out: captured.append(out)) for m in modules]
        for m in modules:
            m.fused_attn = False
        try:
            yield captured
        finally:
            for m, fused in zip(modules, saved):
                m.fused_attn = fused
            for hook in hooks:
                hook.remove()
        return
    previous = src.model.config._attn_implementation
    src.model.set_attn_implementation("eager")
    try:
        yield captured
    finally:
        src.model.set_attn_implementation(previous)


def torch_attentions(src: Any, pixel_values: Any) -> list[np.ndarray]:
    """PyTorch's attention probabilities for ``pixel_values``: per layer (N, heads, T, T) float32."""
    import torch

    with torch.inference_mode(), _explicit_attention(src) as captured:
        if src.library == "timm":
            src.model(pixel_values)
        else:
            captured.extend(src.model(pixel_values, output_attentions=True).attentions)
    return [a.float().numpy() for a in captured]


def check_rollout(src: Any, onnx_path: Path, pixel_values: Any, layout: dict[str, Any]) -> dict[str, Any]:
    """The tapped ONNX graph's attention and rollout against PyTorch's on ``pixel_values``; a miss
    is a :class:`FidelityError`. Returns the numbers for the manifest's fidelity record."""
    import onnxruntime as ort

    from enginekit.runtimes.attention_taps import ATTENTION_TAP, attention_outputs
    from enginekit.runtimes.tasks.explain import AttentionLayout, attention_rollout

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # The tapped graph goes in as bytes: an external data file is read from the model's folder.
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(onnx_path.parent))
    session = ort.InferenceSession(ATTENTION_TAP.apply_onnx(onnx_path).SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, {session.get_inputs()[0].name: pixel_values.numpy()})))
    engine = [got[n] for n in attention_outputs(got)]
    reference = torch_attentions(src, pixel_values)
    if len(engine) != len(reference) or any(a.shape != b.shape for a, b in zip(engine, reference)):
        raise FidelityError(f"the engine's attention ({len(engine)} layers, {[a.shape for a in engine[:1]]}) is not "
                            f"PyTorch's ({len(reference)} layers, {[a.shape for a in reference[:1]]})")
    spec = AttentionLayout(layout["prefix_tokens"], tuple(layout["grid"]), layout["query"])
    probs_err = max(float(np.abs(a - b).max()) for a, b in zip(engine, reference))
    rollout_err = float(np.abs(attention_rollout(engine, spec) - attention_rollout(reference, spec)).max())
    if max(probs_err, rollout_err) > ROLLOUT_ATOL:
        raise FidelityError(f"the engine's attention misses PyTorch's: probabilities max abs {probs_err:.3g}, "
                            f"rollout max abs {rollout_err:.3g} (budget {ROLLOUT_ATOL:g})")
    return {"attention_max_abs": probs_err, "rollout_max_abs": rollout_err, "rollout_budget": ROLLOUT_ATOL}
