"""Per-block parity of a streamed export: each component checked against PyTorch block by block
with one block's weights in memory at a time. On tiny seeded pipelines: every block is found and
passes for fp32, a corrupted block weight fails naming that block, at most one block's weights are
ever real at once, and a compressed (MatMulNBits) graph is judged on its format's budget."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from enginekit.errors import FidelityError
from enginekit.manifest import Manifest

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")


class _Streamed(dict):  # type: ignore[type-arg]
    """A streamed export of a tiny family with the block check on, made on first use:
    ``streamed[name]`` is (folder, manifest)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> tuple[Path, Manifest]:
        from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

        manifest = export_pipeline(name, self.root / name, PipelineExportOptions(streaming=True))
        self[name] = (self.root / name, manifest)
        return self[name]


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Manifest]]:
    return _Streamed(tmp_path_factory.mktemp("streamed"))


def _plan(family: str, component: str) -> tuple[Any, Any, dict[str, Any]]:
    """(plan, pipeline, weight sources) of one component of an empty-weights tiny pipeline."""
    from enginekit.export.diffusion.sd import PipelineExportOptions, _plans
    from enginekit.export.diffusion.sources import resolve_pipeline

    src = resolve_pipeline(family, empty_weights=True)
    make = next(m for m in _plans(src.pipeline, src.family, PipelineExportOptions()) if m().name == component)
    return make(), src.pipeline, src.weights


def _copy_component(folder: Path, component: str, dest: Path) -> Path:
    shutil.copytree(folder / component, dest)
    return dest / "model.onnx"


# The blocks each component must have been checked on (by name suffix), beyond "all found and passed".
EXPECTED = {
    "tiny-flux": {"text_encoder": ("layers.0", "layers.1"), "text_encoder_2": ("block.0", "block.1"),
                  "transformer": ("transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"),
                  "vae_decoder": ("decoder.up_blocks.0", "decoder.mid_block")},
    "tiny-sd15": {"text_encoder": ("layers.0", "layers.1"),
                  "unet": ("unet.down_blocks.0", "unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.0",
                           "unet.up_blocks.1"),
                  "vae_encoder": ("encoder.down_blocks.0", "encoder.mid_block")},
}


@pytest.mark.parametrize("name", [pytest.param("tiny-flux", marks=pytest.mark.slow), "tiny-sd15"])
def test_streamed_export_records_per_block_parity(name: str, streamed: dict[str, tuple[Path, Manifest]]) -> None:
    """Every component of a streamed fp32 export carries a passing per-block record (every block
    found in the graph, near-exact), the manifest's components say checked, the image does not."""
    folder, manifest = streamed[name]
    assert manifest.fidelity["image"]["checked"] is False
    for comp in manifest.components.values():
        fid = comp.fidelity
        assert fid["checked"] is True and fid["method"] == "per-block" and fid["passed"] is True, comp.name
        assert fid["weight_format"] == "fp32" and fid["streamed"] is True
        assert fid["blocks"], comp.name
        for block in fid["blocks"]:
            assert block["found"] is True, (comp.name, block)
            assert block["passed"] is True and block["cosine"] > 0.99999 and block["max_abs"] < 1e-4, block
        names = [b["name"] for b in fid["blocks"]]
        for suffix in EXPECTED[name].get(comp.name, ()):
            assert any(n.endswith(suffix) for n in names), (comp.name, suffix, names)
        assert set(fid["output"]) == {s.name for s in comp.outputs}
        assert all(o["passed"] for o in fid["output"].values())
        assert fid["min_cosine"] == min([b["cosine"] for b in fid["blocks"]] + [o["cosine"] for o in fid["output"].values()])
        assert fid["memory"]["peak_blocks_at_once"] == 1
        listed = manifest.fidelity["components"][comp.name]
        assert listed["checked"] is True and listed["method"] == "per-block" and listed["passed"] is True
        # the temporary graph with the extra outputs is gone (config.json is the component's recorded config)
        assert sorted(p.name for p in (folder / comp.name).iterdir() if p.name != "config.json") == \
            ["model.onnx", "model.onnx.data"]


def _corrupt(onnx_path: Path, prefix: str) -> str:
    """Scale one external weight whose name starts with ``prefix`` by 3 in the data file; its name."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for tensor in model.graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        if tensor.name.startswith(prefix) and "offset" in info and len(tensor.dims) == 2:
            assert tensor.data_type == onnx.TensorProto.FLOAT
            data = np.memmap(onnx_path.parent / info["location"], dtype=np.float32, mode="r+",
                             offset=int(info["offset"]), shape=(int(info["length"]) // 4,))
            data *= 3.0
            data.flush()
            del data
            return tensor.name
    raise AssertionError(f"no external 2-D weight named {prefix}*")


def test_a_corrupted_block_weight_fails_naming_its_block(streamed: dict[str, tuple[Path, Manifest]],
                                                         tmp_path: Path) -> None:
    from enginekit.export.diffusion.block_parity import check_blocks

    folder, _ = streamed["tiny-flux"]
    path = _copy_component(folder, "transformer", tmp_path / "transformer")
    _corrupt(path, "transformer.single_transformer_blocks.0.")
    plan, pipe, weights = _plan("tiny-flux", "transformer")
    with pytest.raises(FidelityError, match=r"block transformer\.single_transformer_blocks\.0 cosine 0\.\d+"):
        check_blocks(plan, path, pipe, weights)
    record = check_blocks(plan, path, pipe, weights, raise_on_miss=False)
    by_name = {b["name"]: b for b in record["blocks"]}
    # the blocks before it still pass; it and the output do not
    assert by_name["transformer.transformer_blocks.0"]["passed"] is True
    assert by_name["transformer.single_transformer_blocks.0"]["passed"] is False
    assert record["output"]["out_sample"]["passed"] is False and record["passed"] is False


def test_block_check_materialises_at_most_one_block_at_a_time(streamed: dict[str, tuple[Path, Manifest]]) -> None:
    """Counted from the storages the weight source hands out (alive or freed), not from the check's
    own books: at any time at most the rest plus the largest block is real, never the whole component,
    every weight is read once, none stays alive after, and the module is left with its fake weights."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.multiprocessing.reductions import StorageWeakRef

    from enginekit.export.diffusion.block_parity import check_blocks, find_blocks

    class Spy:
        def __init__(self, inner: Any) -> None:
            self.inner, self.live, self.peak, self.reads = inner, [], 0, 0

        def describe(self) -> str:
            return self.inner.describe()

        def get(self, names: tuple[str, ...], shape: tuple[int, ...]) -> Any:
            tensor = self.inner.get(names, shape)
            self.reads += 1
            self.live = [(ref, n) for ref, n in self.live if not ref.expired()]
            self.live.append((StorageWeakRef(tensor.untyped_storage()), tensor.numel() * tensor.element_size()))
            self.peak = max(self.peak, sum(n for _, n in self.live))
            return tensor

    folder, _ = streamed["tiny-flux"]
    plan, pipe, weights = _plan("tiny-flux", "transformer")
    spies = {k: Spy(v) for k, v in weights.items()}
    record = check_blocks(plan, folder / "transformer" / "model.onnx", pipe, spies)
    gc.collect()

    def nbytes(module: Any) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    blocks = find_blocks(plan.module)
    total = nbytes(plan.module)
    rest = total - sum(nbytes(b) for b in blocks.values())
    largest = max(nbytes(b) for b in blocks.values())
    spy = spies["transformer"]
    assert len(blocks) >= 3 and largest < total - rest
    assert spy.peak <= rest + largest < total
    assert spy.reads == len(list(plan.module.parameters()))
    assert all(ref.expired() for ref, _ in spy.live)
    assert all(is_fake(p) for p in plan.module.parameters())
    assert record["memory"]["peak_materialised_bytes"] == spy.peak
    assert record["memory"]["peak_blocks_at_once"] == 1


def test_compressed_graph_is_judged_on_its_formats_budget(streamed: dict[str, tuple[Path, Manifest]],
                                                          tmp_path: Path) -> None:
    """An int4 MatMulNBits graph (its quantizer drops the exporter's scope tags from the nodes it
    makes): every block is still found, it passes int4's budget and misses fp32's."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from enginekit.export.diffusion.block_parity import BUDGETS, check_blocks

    folder, _ = streamed["tiny-flux"]
    quantizer = MatMulNBitsQuantizer(onnx.load(str(folder / "transformer" / "model.onnx")), bits=4, block_size=16,
                                     is_symmetric=True)
    quantizer.process()
    (tmp_path / "q").mkdir()
    path = tmp_path / "q" / "model.onnx"
    onnx.save_model(quantizer.model.model, str(path), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=1024)
    assert any(n.op_type == "MatMulNBits" and not n.metadata_props for n in onnx.load(str(path)).graph.node)
    plan, pipe, weights = _plan("tiny-flux", "transformer")
    record = check_blocks(plan, path, pipe, weights)
    assert record["weight_format"] == "int4" and record["budget"]["min_cosine"] == BUDGETS["int4"].min_cosine
    assert record["passed"] is True and all(b["found"] for b in record["blocks"])
    assert record["min_cosine"] < 0.9999  # really compressed
    with pytest.raises(FidelityError, match="per-block parity budget"):
        check_blocks(plan, path, pipe, weights, budget=BUDGETS["fp32"])


def test_blocks_the_graph_does_not_tag_are_recorded_not_found(streamed: dict[str, tuple[Path, Manifest]],
                                                              tmp_path: Path) -> None:
    """A graph without the exporter's scope tags: each block is recorded ``found: false`` with the
    reason, and the outputs are still compared."""
    import onnx

    from enginekit.export.diffusion.block_parity import check_blocks

    folder, _ = streamed["tiny-flux"]
    path = _copy_component(folder, "text_encoder_2", tmp_path / "t5")
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save_model(model, str(path))
    plan, pipe, weights = _plan("tiny-flux", "text_encoder_2")
    record = check_blocks(plan, path, pipe, weights)
    assert record["blocks"] and all(b["found"] is False and "scope" in b["why"] for b in record["blocks"])
    assert record["passed"] is True and record["output"]["last_hidden_state"]["cosine"] > 0.99999
    assert record["blocks_found"] == f"0 of {len(record['blocks'])}"


@pytest.mark.parametrize("block_check", [True, False])
def test_block_check_option(block_check: bool, tmp_path: Path) -> None:
    """``PipelineExportOptions(block_check=False)`` leaves a streamed component unchecked, as before."""
    from enginekit.export.diffusion.sd import PipelineExportOptions, _export_streamed

    plan, pipe, weights = _plan("tiny-flux", "text_encoder")
    opts = PipelineExportOptions(streaming=True, block_check=block_check)
    _, report, _ = _export_streamed(tmp_path, plan, opts, lambda msg: None, 1, 1, pipe, weights)
    assert report["checked"] is block_check and report["streamed"] is True
    if block_check:
        assert report["method"] == "per-block" and report["passed"] is True
        assert report["budget"]["atol"] == opts.atol and report["budget"]["output_min_cosine"] == opts.min_cosine
    else:
        assert report["passed"] is None and "blocks" not in report


@pytest.mark.slow
def test_streamed_compressed_export_is_checked_on_its_formats(tmp_path: Path) -> None:
    """``--streaming --weight-format int4``: each component checked block by block on the format it
    was written in (the transformer int4, T5 int8, the CLIP and the VAE fp32), every block found."""
    from enginekit.export.diffusion.sd import PipelineExportOptions, export_pipeline

    manifest = export_pipeline("tiny-flux", tmp_path / "a", PipelineExportOptions(streaming=True,
                                                                                   weight_format="int4"))
    formats = {n: c.fidelity["weight_format"] for n, c in manifest.components.items()}
    assert formats == {n: c.precision for n, c in manifest.components.items()}
    assert formats["transformer"] == "int4" and formats["text_encoder_2"] == "int8"
    for comp in manifest.components.values():
        fid = comp.fidelity
        assert fid["checked"] is True and fid["passed"] is True, comp.name
        assert fid["budget"]["min_cosine"] == (0.999 if fid["weight_format"] == "fp32" else
                                               {"int8": 0.99, "int4": 0.95}[fid["weight_format"]])
        assert fid["blocks"] and all(b["found"] for b in fid["blocks"]), comp.name


@pytest.mark.parametrize("name,component", [("tiny-sd15", "unet"), ("tiny-flux", "transformer")])
def test_staged_onnx_run_gives_the_whole_graphs_numbers(name: str, component: str,
                                                        streamed: dict[str, tuple[Path, Manifest]]) -> None:
    """The graph cut into one stage per block (each its own session, fed the earlier stages'
    values; a UNet's skip connections cross stages) gives the numbers of the whole graph run once."""
    from enginekit.export.diffusion.block_parity import check_blocks

    folder, manifest = streamed[name]
    plan, pipe, weights = _plan(name, component)
    path = folder / component / "model.onnx"
    if "deep_cache" not in [o.name for o in manifest.component(component).outputs]:
        from enginekit.export.diffusion.deepcache import drop_cache_output

        drop_cache_output(plan)  # exported as the streamed export did
    staged, whole = (check_blocks(plan, path, pipe, weights, staged=s) for s in (True, False))
    assert "one session per block" in staged["runtime"] and "whole graph" in whole["runtime"]
    assert [b["name"] for b in staged["blocks"]] == [b["name"] for b in whole["blocks"]]
    for a, b in zip(staged["blocks"], whole["blocks"]):
        assert a["found"] and b["found"] and a["compared"] == b["compared"], (a, b)
        assert a["cosine"] == pytest.approx(b["cosine"], abs=1e-9) and a["max_abs"] == pytest.approx(b["max_abs"], abs=1e-5)
    for key, out in whole["output"].items():
        assert staged["output"][key]["cosine"] == pytest.approx(out["cosine"], abs=1e-9)
    assert sorted(p.name for p in path.parent.iterdir() if p.name != "config.json") == ["model.onnx", "model.onnx.data"]
