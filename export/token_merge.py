"""Token merging (ToMe, Bolya et al., ICLR 2023) for ViT classifiers, applied before export.

Each transformer block merges the ``r`` most similar pairs of tokens after its
attention, so later blocks attend over fewer tokens: attention costs the square
of the token count, the linear layers its first power. This is ToMe's rule as
``facebookresearch/ToMe`` writes it (``tome/merge.py``, ``tome/patch/timm.py``):

1. the similarity metric is the attention's keys averaged over heads;
2. bipartite soft matching: tokens alternate into sets A and B, each A token's
   best match in B by cosine similarity; the ``r`` best-matched A tokens are
   merged into their B partners, the class token never;
3. merged tokens are size-weighted means, and the attention that follows adds
   ``log(size)`` to its logits ("proportional attention"), so a token standing
   for three still weighs as three.

The merge is written with operations every backend has (TopK, GatherElements,
ScatterElements with an ``add`` reduction), with static token counts per block,
and attention stays ``scaled_dot_product_attention`` (its size bias as an
additive mask), which OpenVINO still fuses. It changes the model's outputs:
the result is judged against the unmerged model like any quantization.
"""

from __future__ import annotations

from typing import Any

from enginekit.errors import ExportError

__all__ = ["is_vit", "merge_plan", "merged_tokens", "token_merged"]


def is_vit(model: Any, library: str) -> bool:
    """Whether ``model`` is a plain ViT: what the manifest's ``vit`` family means (timm's
    :func:`~enginekit.export.sources.timm_family`, transformers' ``ViTForImageClassification``)."""
    if library == "timm":
        from enginekit.export.sources import is_timm_vit

        return is_timm_vit(model)
    return hasattr(model, "vit") and hasattr(model, "classifier")


def merged_tokens(tokens: int, r: int, depth: int) -> list[int]:
    """The token count each block sees when each merges ``r`` pairs (the class token kept)."""
    counts = []
    for i in range(depth):
        counts.append(tokens)
        tokens -= _pairs(r, tokens, last=i == depth - 1)
    return counts


def merge_plan(model: Any, library: str, size: tuple[int, int], r: int) -> dict[str, Any]:
    """What merging ``r`` pairs per block does to ``model`` at input ``size``: the manifest's record."""
    if library == "timm":
        patch, depth = tuple(model.patch_embed.patch_size), len(model.blocks)
    else:
        p = model.config.patch_size
        patch, depth = (p, p) if isinstance(p, int) else tuple(p), model.config.num_hidden_layers
    tokens = 1 + (size[0] // patch[0]) * (size[1] // patch[1])
    return {"r": r, "method": "ToMe: bipartite soft matching, size-weighted merge, proportional attention",
            "tokens_per_block": merged_tokens(tokens, r, depth)}


def token_merged(model: Any, library: str, r: int) -> Any:
    """A module with ``model``'s weights whose blocks merge ``r`` token pairs each.

    It exposes what the classifier export calls on a timm model
    (``forward_features``, ``forward_head``, ``get_classifier``), for timm and
    transformers ViTs alike. ``model`` itself is not changed.
    """
    if r < 1:
        raise ExportError(f"token merging needs r >= 1 pairs per block, got {r}")
    if library == "timm":
        return _timm_class()(model, r)
    if library == "transformers":
        return _transformers_class()(model, r)
    raise ExportError(f"token merging is built for timm and transformers ViTs, not {library} models")


def _pairs(r: int, tokens: int, *, last: bool) -> int:
    """Pairs a block merges: none in the last block (only the class token is read after it, and
    merging never changes it), and never more than half the tokens besides the class token."""
    return 0 if last else min(r, (tokens - 1) // 2)


def _match(metric: Any, r: int) -> tuple[Any, Any, Any]:
    """Bipartite soft matching: the kept A tokens, the merged A tokens and their B partners, as rows
    of the flattened batch (A's rows for the first two, B's for the third), made once per block for
    every tensor merged."""
    import torch

    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2, :], metric[:, 1::2, :]
    scores = a @ b.transpose(-1, -2)
    # The class token (A's first) is never merged: push its best score below any cosine.
    protect = torch.zeros(scores.shape[1], 1, dtype=scores.dtype, device=scores.device)
    protect[0, 0] = -1e4
    scores = scores + protect
    node_max = scores.amax(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx = edge_idx[:, r:].sort(dim=1)[0]  # the class token stays first
    src_idx = edge_idx[:, :r]
    # Each merged token's partner: the argmax of its row only (an argmax over every row of A is a
    # TopK that costs OpenVINO more than the rest of the merge).
    n, t1, t2 = scores.shape
    src_rows = _flat(src_idx, t1)
    dst_idx = scores.reshape(n * t1, t2)[src_rows].reshape(n, r, t2).argmax(dim=-1)
    return _flat(unm_idx, t1), src_rows, _flat(dst_idx, t2)


def _flat(idx: Any, tokens: int) -> Any:
    """(B, n) token indices as indices into the (B * tokens) rows of a flattened batch."""
    import torch

    return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * tokens).reshape(-1)


def _merge(x: Any, idx: tuple[Any, Any, Any], r: int) -> Any:
    # Row gathers and an index_add on the flattened batch: one Gather / ScatterND each, where
    # torch.gather/scatter_add over expanded (B, n, C) indices export as GatherElements/ScatterElements
    # fed by a Broadcast of the indices, which cost OpenVINO more than the merge saves.
    import torch

    unm_rows, src_rows, dst_rows = idx
    src, dst = x[:, ::2, :], x[:, 1::2, :]
    n, t1, c = src.shape
    t2 = dst.shape[1]
    src = src.reshape(n * t1, c)
    unm = src[unm_rows].reshape(n, t1 - r, c)
    dst = dst.reshape(n * t2, c).index_add(0, dst_rows, src[src_rows]).reshape(n, t2, c)
    return torch.cat([unm, dst], dim=1)


def _merge_weighted(x: Any, size: Any, metric: Any, r: int) -> tuple[Any, Any]:
    """Merge ``r`` pairs of ``x`` as size-weighted means; returns (x, size)."""
    idx = _match(metric, r)
    x = _merge(x * size, idx, r)
    size = _merge(size, idx, r)
    return x / size, size


def _attend(q: Any, k: Any, v: Any, size: Any) -> Any:
    import torch.nn.functional as F

    # Proportional attention: log(size) on every query's logits for each key.
    bias = size.log()[:, None, None, :, 0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _timm_class() -> type:
    import torch

    class TimmTokenMerged(torch.nn.Module):
        def __init__(self, model: Any, r: int) -> None:
            super().__init__()
            self.model, self.r = model, r
            for blk in model.blocks:
                attn = getattr(blk, "attn", None)
                if attn is None or not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
                    raise ExportError(f"token merging knows timm's plain ViT blocks, not {type(blk).__name__}")
            if getattr(model, "num_prefix_tokens", 1) != 1 or getattr(model, "global_pool", "token") != "token":
                raise ExportError("token merging needs a ViT pooled on its class token alone "
                                  "(no register/distillation tokens, global_pool='token')")

        def _attention(self, attn: Any, x: Any, size: Any) -> tuple[Any, Any]:
            b, n, _ = x.shape
            qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            out = _attend(q, k, v, size).transpose(1, 2).reshape(b, n, attn.attn_dim)
            return attn.proj(attn.norm(out)), k.mean(1)

        def forward_features(self, x: Any) -> Any:
            m = self.model
            x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
            size = torch.ones_like(x[..., :1])
            for i, blk in enumerate(m.blocks):
                out, metric = self._attention(blk.attn, blk.norm1(x), size)
                x = x + blk.drop_path1(blk.ls1(out))
                r = _pairs(self.r, x.shape[1], last=i == len(m.blocks) - 1)
                if r > 0:
                    x, size = _merge_weighted(x, size, metric, r)
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            return m.norm(x)

        def forward_head(self, x: Any, pre_logits: bool = False) -> Any:
            return self.model.forward_head(x, pre_logits=pre_logits)

        def get_classifier(self) -> Any:
            return self.model.get_classifier()

        def forward(self, x: Any) -> Any:
            return self.forward_head(self.forward_features(x))

    return TimmTokenMerged


def _transformers_class() -> type:
    import torch

    class TransformersTokenMerged(torch.nn.Module):
        """transformers' ``ViTForImageClassification`` with merging (the layouts of transformers 5,
        ``vit.layers[i].attention.q_proj``, and 4, ``vit.encoder.layer[i].attention.attention.query``);
        timm's method names, so the classifier export takes it as a timm model."""

        def __init__(self, model: Any, r: int) -> None:
            super().__init__()
            self.model, self.r = model, r
            vit = getattr(model, "vit", None)
            layers = getattr(vit, "layers", None) or getattr(getattr(vit, "encoder", None), "layer", None)
            if layers is None or not hasattr(model, "classifier"):
                raise ExportError(f"token merging knows ViTForImageClassification, not {type(model).__name__}")
            self.layers = layers
            self.v5 = hasattr(layers[0].attention, "q_proj")

        def _attention(self, layer: Any, x: Any, size: Any) -> tuple[Any, Any]:
            b, n, _ = x.shape
            if self.v5:
                at = layer.attention
                heads, dim = at.num_attention_heads, at.head_dim
                q_proj, k_proj, v_proj, o_proj = at.q_proj, at.k_proj, at.v_proj, at.o_proj
            else:
                sa = layer.attention.attention
                heads, dim = sa.num_attention_heads, sa.attention_head_size
                q_proj, k_proj, v_proj, o_proj = sa.query, sa.key, sa.value, layer.attention.output.dense

            def split(t: Any) -> Any:
                return t.view(b, n, heads, dim).transpose(1, 2)

            q, k, v = split(q_proj(x)), split(k_proj(x)), split(v_proj(x))
            out = _attend(q, k, v, size).transpose(1, 2).reshape(b, n, heads * dim)
            return o_proj(out), k.mean(1)

        def _mlp(self, layer: Any, x: Any) -> Any:
            if self.v5:
                return x + layer.mlp(layer.layernorm_after(x))
            return layer.output(layer.intermediate(layer.layernorm_after(x)), x)

        def forward_features(self, x: Any) -> Any:
            vit = self.model.vit
            x = vit.embeddings(x)
            size = torch.ones_like(x[..., :1])
            for i, layer in enumerate(self.layers):
                out, metric = self._attention(layer, layer.layernorm_before(x), size)
                x = x + out
                r = _pairs(self.r, x.shape[1], last=i == len(self.layers) - 1)
                if r > 0:
                    x, size = _merge_weighted(x, size, metric, r)
                x = self._mlp(layer, x)
            return vit.layernorm(x)

        def forward_head(self, x: Any, pre_logits: bool = False) -> Any:
            emb = x[:, 0, :]
            return emb if pre_logits else self.model.classifier(emb)

        def get_classifier(self) -> Any:
            return self.model.classifier

        def forward(self, x: Any) -> Any:
            return self.forward_head(self.forward_features(x))

    return TransformersTokenMerged
