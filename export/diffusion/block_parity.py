"""Per-block parity for a streamed export: the exported ONNX component against PyTorch, one block's
weights in memory at a time, so a component too large to hold in fp32 is still checked.

1. **Blocks** (:func:`find_blocks`): the children of every outermost ``torch.nn.ModuleList`` that
   holds parameters (FLUX ``transformer_blocks`` and ``single_transformer_blocks``, SD3
   ``transformer_blocks``, T5 ``encoder.block``, CLIP ``encoder.layers``, a UNet's or VAE's
   ``down_blocks``/``up_blocks``), and beside such a list any module holding more parameters than
   its smallest block (a UNet's or VAE's ``mid_block``). Everything else is *the rest* (embeddings,
   norms, projections, the timestep MLP): it is small next to the blocks and is materialised once,
   for the whole run.
2. **PyTorch**: the plan's wrapper runs on the export's parity inputs with a forward pre-hook per
   block that swaps real tensors (read from the component's :class:`WeightSource`) in for the
   block's fake parameters, and a forward hook that records the block's outputs (every float
   tensor of them) and swaps the fakes back. Peak: the rest plus one block.
3. **ONNX**: the dynamo exporter tags each node with its module scopes
   (``pkg.torch.onnx.name_scopes``, kept through ``optimize()``); a block's outputs are the float
   values its nodes make and a node outside it (or the graph output) reads. The graph is cut into
   stages, a stage the nodes up to the end of one block (in the order the blocks ran), and each
   stage runs in its own ONNX Runtime session over a temporary graph written in the component's
   folder (the graph only: the weights stay in ``model.onnx.data``, which it names), fed the
   values earlier stages made, so this side too holds one block's weights at a time
   (``staged=False``: the whole graph in one session, with the block outputs added as outputs).
4. Each PyTorch output of a block is compared with the block's ONNX output of the same shape that
   is closest to it (a block's outputs are told apart by shape, then by value), and the final
   outputs with the component's own. A block the graph does not tag is recorded ``found: false``
   with the reason; the final outputs are always compared.

The budget follows the weights in the graph (:func:`weight_format`): fp32 gets the in-memory
export's tolerance, compressed weights a looser cosine floor (:data:`BUDGETS`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from enginekit.errors import ExportError, FidelityError, one_line
from enginekit.export.diffusion.block_graph import (block_values, elem_types, run_staged, run_with_outputs,
                                                     weight_format)
from enginekit.fidelity import cosine_similarity

__all__ = ["BUDGETS", "BlockBudget", "check_blocks", "find_blocks", "weight_format"]


@dataclass(frozen=True)
class BlockBudget:
    """What a block and the component's outputs must reach: each block's outputs a cosine of at
    least ``min_cosine``, the component's outputs ``output_min_cosine``; with ``atol`` set, every
    compared tensor also a max abs of at most ``atol + rtol * max |torch|`` (the in-memory export's
    rule). ``atol=None`` leaves max abs recorded but unjudged (compressed weights)."""

    min_cosine: float = 0.999
    output_min_cosine: float = 0.9999
    atol: float | None = 1e-4
    rtol: float = 1e-3


#: The budget per weight format found in the graph. fp32 is the in-memory export's tolerance with
#: a per-block cosine floor of 0.999. The others are provisional, set on the tiny configs before
#: any full-size measurement: fp16 0.995 (tiny T5 in fp16 reaches 0.99898 after two blocks),
#: bf16 and int8 0.99, int4 0.95 (per block and at the outputs).
BUDGETS: dict[str, BlockBudget] = {
    "fp32": BlockBudget(),
    "fp16": BlockBudget(min_cosine=0.995, output_min_cosine=0.995, atol=None),
    "bf16": BlockBudget(min_cosine=0.99, output_min_cosine=0.99, atol=None),
    "int8": BlockBudget(min_cosine=0.99, output_min_cosine=0.99, atol=None),
    "int4": BlockBudget(min_cosine=0.95, output_min_cosine=0.95, atol=None),
}


# --------------------------------------------------------------------------- blocks


def find_blocks(module: Any) -> dict[str, Any]:
    """The repeated blocks of ``module`` by qualified name, in module order (see the module doc)."""
    import torch

    def n_params(m: Any) -> int:
        return sum(p.numel() for p in m.parameters())

    blocks: dict[str, Any] = {}
    taken: list[str] = []  # the lists and blocks chosen: nothing under them is looked at again

    def under(name: str) -> bool:
        return any(name == t or name.startswith(t + ".") for t in taken)

    for name, mod in module.named_modules():
        if not name or under(name) or not isinstance(mod, torch.nn.ModuleList):
            continue
        children = [(f"{name}.{k}", c) for k, c in mod.named_children() if n_params(c) > 0]
        if not children:
            continue
        taken.append(name)
        blocks.update(children)
        # The big siblings of a block list (a mid block between down and up blocks) are blocks too.
        parent_name, _, own = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        smallest = min(n_params(c) for _, c in children)
        for sib_name, sib in parent.named_children():
            full = f"{parent_name}.{sib_name}" if parent_name else sib_name
            if (sib_name != own and not isinstance(sib, torch.nn.ModuleList) and not under(full)
                    and n_params(sib) > smallest):
                taken.append(full)
                blocks[full] = sib
    order = {name: i for i, (name, _) in enumerate(module.named_modules())}
    return dict(sorted(blocks.items(), key=lambda kv: order[kv[0]]))


# --------------------------------------------------------------------------- the PyTorch side


class _Materialiser:
    """Swaps real tensors in for a set of fake parameters and back, keeping books on the bytes
    and blocks in memory at once."""

    def __init__(self, module: Any, weights: dict[str, Any], sources: dict[str, Any]) -> None:
        # Every place a parameter sits (tied ones sit in several), by the parameter's id.
        self.places: dict[int, list[tuple[Any, str]]] = {}
        self.names: dict[int, str] = {}
        for prefix, mod in module.named_modules(remove_duplicate=False):
            for leaf, p in mod._parameters.items():
                if p is not None:
                    full = f"{prefix}.{leaf}" if prefix else leaf
                    self.places.setdefault(id(p), []).append((mod, leaf))
                    self.names.setdefault(id(p), full)
        self.fakes: dict[int, Any] = {}
        for mod_leafs in self.places.values():
            mod, leaf = mod_leafs[0]
            self.fakes[id(mod._parameters[leaf])] = mod._parameters[leaf]
        self.weights, self.sources = weights, sources
        self.live_bytes = self.peak_bytes = 0
        self.live_blocks: set[str] = set()
        self.peak_blocks = 0

    def load(self, ids: list[int]) -> int:
        import torch

        loaded = 0
        for pid in ids:
            fake = self.fakes[pid]
            name = self.names[pid]
            weight = self.weights.get(name)
            if weight is None:
                raise ExportError(f"block check: no weight source for parameter {name!r}")
            tensor = self.sources[weight.component].get(weight.names, tuple(fake.shape)).to(fake.dtype)
            real = torch.nn.Parameter(tensor, requires_grad=False)
            for mod, leaf in self.places[pid]:
                mod._parameters[leaf] = real
            loaded += tensor.numel() * tensor.element_size()
        self.live_bytes += loaded
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return loaded

    def unload(self, ids: list[int], n_bytes: int) -> None:
        for pid in ids:
            for mod, leaf in self.places[pid]:
                mod._parameters[leaf] = self.fakes[pid]
        self.live_bytes -= n_bytes


def _ids(module: Any) -> list[int]:
    return list(dict.fromkeys(id(p) for p in module.parameters()))


def _float_leaves(out: Any) -> list[Any]:
    """The float tensors of a block's output (a tensor, or nested tuples/lists/dicts of them)."""
    import torch
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0]


def _torch_side(plan: Any, blocks: dict[str, Any], mat: _Materialiser,
                ) -> tuple[dict[str, list[np.ndarray]], dict[str, int], dict[str, np.ndarray], int, dict[str, int]]:
    """Run the wrapper on the parity inputs with the blocks materialised one at a time: each block's
    output tensors, how often each ran, the final outputs, the rest's bytes, each block's bytes."""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    in_blocks = {pid for b in blocks.values() for pid in _ids(b)}
    rest = [pid for pid in _ids(plan.module) if pid not in in_blocks]
    block_ids = {name: [pid for pid in _ids(b)] for name, b in blocks.items()}
    block_bytes = {name: sum(mat.fakes[p].numel() * mat.fakes[p].element_size() for p in ids)
                   for name, ids in block_ids.items()}
    recorded: dict[str, list[np.ndarray]] = {}
    calls: dict[str, int] = {}
    handles = []
    loaded: dict[str, int] = {}

    def pre(name: str) -> Any:
        def hook(mod: Any, args: Any) -> None:
            loaded[name] = mat.load(block_ids[name])
            mat.live_blocks.add(name)
            mat.peak_blocks = max(mat.peak_blocks, len(mat.live_blocks))
        return hook

    def post(name: str) -> Any:
        def hook(mod: Any, args: Any, out: Any) -> None:
            recorded[name] = [t.detach().float().numpy().copy() for t in _float_leaves(out)]
            calls[name] = calls.get(name, 0) + 1
            mat.unload(block_ids[name], loaded.pop(name))
            mat.live_blocks.discard(name)
        return hook

    rest_bytes = 0
    try:
        for name, block in blocks.items():
            handles.append(block.register_forward_pre_hook(pre(name)))
            handles.append(block.register_forward_hook(post(name)))
        rest_bytes = mat.load(rest)
        with torch.inference_mode():
            out = plan.module(*plan.parity)
    except ExportError:
        raise
    except Exception as exc:  # a fake weight met outside its block's forward, or a source's failure
        raise ExportError(f"block check of {plan.name}: the PyTorch run failed: {one_line(exc)}") from exc
    finally:
        for h in handles:
            h.remove()
        for name in list(loaded):  # a block that raised mid-way
            mat.unload(block_ids[name], loaded.pop(name))
        mat.unload(rest, rest_bytes)
    outs = out if isinstance(out, tuple) else (out,)
    if any(is_fake(t) for t in outs):
        raise ExportError(f"block check of {plan.name}: a block's weights are used outside its forward "
                          "(the output is fake)")
    final = {spec.name: t.detach().float().numpy() for spec, t in zip(plan.outputs, outs)}
    return recorded, calls, final, rest_bytes, block_bytes


# --------------------------------------------------------------------------- compare


def _numbers(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    ref32, got32 = ref.astype(np.float32), got.astype(np.float32)
    return cosine_similarity(ref32, got32), float(np.abs(got32 - ref32).max()) if ref.size else 0.0


def _within(cos: float, max_abs: float, ref: np.ndarray, budget: BlockBudget, floor: float) -> bool:
    if not cos >= floor:  # (a NaN misses)
        return False
    if budget.atol is None:
        return math.isfinite(max_abs)
    return max_abs <= budget.atol + budget.rtol * float(np.abs(ref).max() if ref.size else 0.0)


def _budget_text(budget: BlockBudget, output: bool) -> str:
    floor = budget.output_min_cosine if output else budget.min_cosine
    return f"budget cosine {floor}" + (f", max abs {budget.atol} + {budget.rtol} x max |torch|"
                                       if budget.atol is not None else "")


def check_blocks(plan: Any, onnx_path: str | Path, pipe: Any, weights: dict[str, Any], *,
                 budget: BlockBudget | None = None, budgets: Mapping[str, BlockBudget] = BUDGETS,
                 raise_on_miss: bool = True, staged: bool = True) -> dict[str, Any]:
    """Check ``onnx_path`` (the exported ``plan``; fp32 or compressed weights) against PyTorch block
    by block with one block's weights in memory at a time (``plan.module`` holds fake parameters;
    ``weights`` maps each component to its :class:`WeightSource`). Returns the fidelity record; a
    block or output past ``budget`` (by default ``budgets`` of the graph's weight format, see
    :func:`weight_format`) raises :class:`FidelityError` naming it, unless ``raise_on_miss`` is off."""
    import onnx

    from enginekit.export.diffusion.streaming import _weights_of

    started = time.monotonic()
    onnx_path = Path(onnx_path)
    graph_only = onnx.load(str(onnx_path), load_external_data=False)
    fmt = weight_format(graph_only)
    budget = budget or budgets.get(fmt) or BUDGETS.get(fmt, BUDGETS["int4"])
    blocks = find_blocks(plan.module)
    types = elem_types(graph_only)
    values, why = block_values(graph_only, list(blocks), types)
    del graph_only

    mat = _Materialiser(plan.module, _weights_of(plan.module, pipe, weights), weights)
    recorded, calls, final_ref, rest_bytes, block_bytes = _torch_side(plan, blocks, mat)

    ran = list(recorded)  # in the order they ran
    extra = [v for name in ran if name not in why and calls[name] == 1 for v in values[name]]
    feeds = {spec.name: t.numpy() for spec, t in zip(plan.inputs, plan.parity)}
    if staged:
        got = run_staged(onnx_path, ran, extra, types, feeds)
    else:
        got = run_with_outputs(onnx_path, extra, types, feeds)

    records: list[dict[str, Any]] = []
    misses: list[str] = []
    for name in ran:
        rec: dict[str, Any] = {"name": name, "bytes": block_bytes[name]}
        reason = why.get(name) or (f"ran {calls[name]} times in one forward" if calls[name] != 1 else None)
        candidates = [got[v] for v in values[name] if v in got] if reason is None else []
        pairs = []
        for ref in recorded[name]:
            same = [_numbers(ref, c) for c in candidates if c.shape == ref.shape]
            if same:
                pairs.append((ref, max(same)))
        if reason is None and not pairs:
            reason = "none of its ONNX outputs has the shape of a PyTorch output"
        if reason is not None:
            records.append({**rec, "found": False, "why": reason})
            continue
        cos = min(c for _, (c, _) in pairs)
        max_abs = max(m for _, (_, m) in pairs)
        passed = all(_within(c, m, ref, budget, budget.min_cosine) for ref, (c, m) in pairs)
        records.append({**rec, "found": True, "compared": f"{len(pairs)} of {len(recorded[name])} outputs",
                        "cosine": cos, "max_abs": max_abs, "passed": passed})
        if not passed:
            misses.append(f"block {name} cosine {cos:.6f}, max abs {max_abs:.3g} ({_budget_text(budget, False)})")

    output: dict[str, Any] = {}
    for spec_name, ref in final_ref.items():
        if spec_name not in got:
            raise ExportError(f"block check of {plan.name}: the graph has no output {spec_name!r}")
        cos, max_abs = _numbers(ref, got[spec_name])
        ok = _within(cos, max_abs, ref, budget, budget.output_min_cosine)
        output[spec_name] = {"cosine": cos, "max_abs": max_abs, "passed": ok}
        if not ok:
            misses.append(f"output {spec_name} cosine {cos:.6f}, max abs {max_abs:.3g} ({_budget_text(budget, True)})")
    found = [r for r in records if r["found"]]
    cosines = [r["cosine"] for r in found] + [o["cosine"] for o in output.values()]
    record = {
        "checked": True,
        "method": "per-block",
        "reference": "pytorch fp32, one block materialised at a time (hooks)",
        "runtime": "onnxruntime-cpu, " + ("one session per block's stage of the graph" if staged else
                                          "the whole graph in one session"),
        "weight_format": fmt,
        "inputs": {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in feeds.items()},
        "input_kind": "the export's parity inputs",
        "budget": asdict(budget),
        "blocks": records,
        "blocks_found": f"{len(found)} of {len(records)}",
        "output": output,
        "min_cosine": min(cosines),
        "max_abs": max([r["max_abs"] for r in found] + [o["max_abs"] for o in output.values()]),
        "passed": not misses,
        "memory": {"rest_bytes": rest_bytes, "largest_block_bytes": max(block_bytes.values(), default=0),
                   "peak_materialised_bytes": mat.peak_bytes, "peak_blocks_at_once": mat.peak_blocks},
        "seconds": round(time.monotonic() - started, 2),
    }
    if misses and raise_on_miss:
        raise FidelityError(f"{plan.name} ({fmt} weights) misses its per-block parity budget: {'; '.join(misses)}")
    return record
