"""Weight compression on the way: MatMul/Gemm weights to int8/int4 MatMulNBits tensor by
tensor, family defaults per component, both backends compiling the result compressed,
the image gate, and a peak memory bounded by the largest tensor."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from enginekit.errors import OptionError, QuantizationError
from enginekit.export.compress import WeightFormat, compress_component, written_files


def _available(backend: str) -> bool:
    from tests.conftest import installed_backends

    return backend in installed_backends()


# -- one component, built in the test ---------------------------------------------------

H = 64


def _component(folder: Path, seed: int = 0, w3_scale: float = 1.0) -> dict[str, np.ndarray]:
    """A small graph with external data: MatMul, Gemm (transB, bias), a weight two nodes
    share, a 3-D weight, and a MatMul whose K is under any group size."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = {"W1": rng.standard_normal((H, 2 * H)), "W2": rng.standard_normal((H, 2 * H)),  # W2 is (N, K): transB
         "b2": rng.standard_normal(H), "W3": rng.standard_normal((H, H)), "Ws": rng.standard_normal((H, H)),
         "W3d": rng.standard_normal((1, H, H)), "Wk": rng.standard_normal((8, H)), "W4": rng.standard_normal((H, 32))}
    w = {k: (v * (1.0 if k == "b2" else 0.1)).astype(np.float32) for k, v in w.items()}
    w["W3"] *= np.float32(w3_scale)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="first"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("Gemm", ["r1", "W2", "b2"], ["h2"], name="gemm", transB=1),
        helper.make_node("MatMul", ["h2", "W3"], ["h3"], name="middle"),
        helper.make_node("MatMul", ["h3", "Ws"], ["s1"], name="shared_a"),
        helper.make_node("MatMul", ["s1", "Ws"], ["s2"], name="shared_b"),
        helper.make_node("MatMul", ["s2", "W3d"], ["d3"], name="three_d"),
        helper.make_node("Slice", ["d3", "zero", "eight", "axis"], ["k8"], name="slice"),
        helper.make_node("MatMul", ["k8", "Wk"], ["small"], name="small_k"),
        helper.make_node("Add", ["small", "d3"], ["sum"], name="add"),
        helper.make_node("MatMul", ["sum", "W4"], ["y"], name="last"),
    ]
    consts = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero", 0), ("eight", 8), ("axis", -1))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in w.items()] + consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=64)
    return w


def _run(folder: Path, x: np.ndarray, backend: str, entry: str = "model.onnx") -> np.ndarray:
    if backend == "onnxruntime":
        import onnxruntime as ort

        return ort.InferenceSession(str(folder / entry), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    import openvino as ov

    core = ov.Core()
    return core.compile_model(core.read_model(str(folder / "model.onnx")), "CPU",
                              {"INFERENCE_PRECISION_HINT": "f32"})({"x": x})[0]


def _ops(folder: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("mode,sym,tol", [("int8", False, 0.02), ("int8", True, 0.02), ("int4", False, 0.25),
                                          ("int4", True, 0.25)])
def test_component_is_compressed_and_runs_on_both_backends(tmp_path: Path, mode: str, sym: bool, tol: float) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _component(src)
    record = compress_component(src, WeightFormat(mode, group_size=16, sym=sym), out)
    ops = _ops(out)
    # first, gemm, middle and last compress; the shared, 3-D and small-K weights stay float.
    assert ops.count("MatMulNBits") == 4 and ops.count("MatMul") == 4 and "Gemm" not in ops
    assert record["layers"] == ({"int4": 0, "int8": 4, "float": 4} if mode == "int8" else
                                {"int4": 2, "int8": 2, "float": 4})
    why = {k["node"]: (k["precision"], k["why"]) for k in record["higher_precision"]}
    assert why["shared_a"][1] == why["shared_b"][1] == "weight shared by several nodes"
    assert why["three_d"][1] == "3-D weight" and why["small_k"][1] == "K 8 < group size 16"
    if mode == "int4":  # NNCF's backup precision for the first and last layers
        assert why["first"][0] == why["last"][0] == "int8" and "first layer" in why["first"][1]
    assert record["format"] == mode and record["group_size"] == 16 and record["sym"] is sym
    assert record["ratio"] == (1.0 if mode == "int4" else None)
    assert (out / "model.onnx.data").stat().st_size < 0.6 * (src / "model.onnx.data").stat().st_size
    x = np.random.default_rng(1).standard_normal((3, H)).astype(np.float32)
    ref = _run(src, x, "onnxruntime")
    for backend in ("onnxruntime", "openvino"):
        if _available(backend):
            assert _rel(_run(out, x, backend), ref) < tol, backend


def test_ratio_puts_the_rest_in_int8_in_nncfs_order(tmp_path: Path) -> None:
    from nncf.quantization.algorithms.weight_compression.config import WeightCompressionConfig
    from nncf.quantization.algorithms.weight_compression.weight_lowering import get_integer_quantization_error
    from nncf.tensor import Tensor

    src = tmp_path / "src"
    w = _component(src, w3_scale=5.0)  # a larger int8 error: the lower NNCF score, so int4 first
    err = {k: get_integer_quantization_error(Tensor(w[k]), (ax,), WeightCompressionConfig(), reduction="max_mean")
           for k, ax in (("W2", 1), ("W3", 0))}
    assert err["W3"] > err["W2"]
    # The int4 pool is gemm (64x128) and middle (64x64): middle alone is a third of it.
    rec = compress_component(src, WeightFormat("int4", group_size=16, ratio=0.5), tmp_path / "half")
    why = {k["node"]: k["why"] for k in rec["higher_precision"] if k["precision"] == "int8"}
    assert rec["layers"]["int4"] == 1 and "gemm" in why and why["gemm"].startswith("ratio 0.5")
    assert rec["parameters"]["int4"] == H * H
    for ratio, int4 in ((0.0, 0), (1.0, 2)):
        rec = compress_component(src, WeightFormat("int4", group_size=16, ratio=ratio), tmp_path / f"r{ratio}")
        assert rec["layers"]["int4"] == int4


def test_inline_weights_fp16_and_fp32(tmp_path: Path) -> None:
    import onnx

    src = tmp_path / "src"
    _component(src)
    onnx.save_model(onnx.load(str(src / "model.onnx")), str(tmp_path / "inline.onnx"))
    inline = tmp_path / "inline"
    inline.mkdir()
    (tmp_path / "inline.onnx").rename(inline / "model.onnx")
    rec = compress_component(inline, WeightFormat("int8", group_size=16), tmp_path / "q")
    assert rec["layers"]["int8"] == 4 and (tmp_path / "q" / "model.onnx.data").exists()
    x = np.random.default_rng(2).standard_normal((2, H)).astype(np.float32)
    ref = _run(src, x, "onnxruntime")
    assert _rel(_run(tmp_path / "q", x, "onnxruntime"), ref) < 0.02
    # Every tensor external, the 8-byte Slice constants too: they come back inline, where ORT reads them.
    onnx.save_model(onnx.load(str(src / "model.onnx")), str(tmp_path / "all.onnx"), save_as_external_data=True,
                    location="all.onnx.data", size_threshold=0)
    (tmp_path / "all").mkdir()
    for name in ("all.onnx", "all.onnx.data"):
        (tmp_path / name).rename(tmp_path / "all" / name)
    compress_component(tmp_path / "all", WeightFormat("int8", group_size=16), tmp_path / "q2", entry="all.onnx")
    assert _rel(_run(tmp_path / "q2", x, "onnxruntime", entry="all.onnx"), ref) < 0.02
    assert written_files(tmp_path / "q2", "all.onnx") == ["all.onnx", "model.onnx.data"]
    compress_component(tmp_path / "all", WeightFormat("fp32"), tmp_path / "f2", entry="all.onnx")
    assert written_files(tmp_path / "f2", "all.onnx") == ["all.onnx", "all.onnx.data"]
    assert compress_component(src, WeightFormat("fp16"), tmp_path / "h")["format"] == "fp16"
    assert _rel(_run(tmp_path / "h", x, "onnxruntime"), ref) < 0.01
    compress_component(src, WeightFormat("fp32"), tmp_path / "f")
    np.testing.assert_array_equal(_run(tmp_path / "f", x, "onnxruntime"), ref)


@pytest.mark.parametrize("fmt", [WeightFormat("int4", group_size=16, ratio=0.5), WeightFormat("int8", group_size=16),
                                 WeightFormat("bf16"), WeightFormat("fp32")], ids=["int4-ratio", "int8", "bf16", "fp32"])
def test_weights_from_a_function_give_the_same_files(tmp_path: Path, fmt: WeightFormat) -> None:
    """A streaming export's path: the graph without its data, each weight handed over by name."""
    import onnx

    from enginekit.export.compress import compress_model

    src = tmp_path / "src"
    _component(src)
    expected = compress_component(src, fmt, tmp_path / "a")
    full = onnx.load(str(src / "model.onnx"))
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in full.graph.initializer}
    bare = onnx.load(str(src / "model.onnx"), load_external_data=False)
    asked: list[str] = []

    def tensor(name: str) -> np.ndarray:
        asked.append(name)
        return arrays[name].astype(np.float64) if arrays[name].dtype == np.float32 else arrays[name]  # cast back

    got = compress_model(bare, fmt, tmp_path / "b", tensor)
    assert got == expected
    if fmt.by_pass:
        for name in ("model.onnx", "model.onnx.data"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    else:  # compress_component copies fp32 files as they are; compress_model writes what it is given
        x = np.random.default_rng(4).standard_normal((2, H)).astype(np.float32)
        np.testing.assert_array_equal(_run(tmp_path / "b", x, "onnxruntime"), _run(src, x, "onnxruntime"))
    assert set(asked) == set(arrays)
    with pytest.raises(QuantizationError, match=r"W\d: the tensor given has shape \(2, 2\)"):
        compress_model(onnx.load(str(src / "model.onnx"), load_external_data=False), fmt, tmp_path / "c",
                       lambda name: np.zeros((2, 2), np.float32))


def test_bf16_component_stores_weights_in_bf16_and_runs_on_both_backends(tmp_path: Path) -> None:
    """bf16: each float32 weight of at least 1024 values is stored as bfloat16 (rounded to nearest
    even) and cast back to float32 where it is read; small tensors stay float32."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper

    src, out = tmp_path / "src", tmp_path / "out"
    w = _component(src)
    record = compress_component(src, WeightFormat("bf16"), out)
    assert record["format"] == "bf16" and record["tensors_bf16"] == 6  # all but b2 (64) and Wk (512 values)
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    assert {n for n, t in inits.items() if t.data_type == onnx.TensorProto.BFLOAT16} == \
        {f"{n}_bf16" for n in ("W1", "W2", "W3", "Ws", "W3d", "W4")}
    assert inits["b2"].data_type == inits["Wk"].data_type == onnx.TensorProto.FLOAT
    stored = numpy_helper.to_array(inits["W1_bf16"])
    np.testing.assert_array_equal(np.asarray(stored, dtype=np.float32),
                                  w["W1"].astype(ml_dtypes.bfloat16).astype(np.float32))
    assert [n.op_type for n in model.graph.node].count("Cast") == 6
    assert (out / "model.onnx.data").stat().st_size < 0.6 * (src / "model.onnx.data").stat().st_size
    x = np.random.default_rng(1).standard_normal((3, H)).astype(np.float32)
    ref = _run(src, x, "onnxruntime")
    for backend in ("onnxruntime", "openvino"):
        if _available(backend):
            assert _rel(_run(out, x, backend), ref) < 0.02, backend


def test_fp16_refuses_a_component_too_large_for_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp16 converter holds the whole component: past the memory available it is refused, naming
    the tensor-by-tensor formats, before anything is written."""
    import psutil

    src = tmp_path / "src"
    _component(src)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 1000})())
    with pytest.raises(QuantizationError, match=r"src: fp16 conversion holds the whole component.*bf16"):
        compress_component(src, WeightFormat("fp16"), tmp_path / "h")
    assert not (tmp_path / "h" / "model.onnx").exists()


def test_fp16_component_gets_fp16_scales(tmp_path: Path) -> None:
    import onnx

    src = tmp_path / "src"
    _component(src)
    compress_component(src, WeightFormat("fp16"), tmp_path / "h")
    rec = compress_component(tmp_path / "h", WeightFormat("int8", group_size=16), tmp_path / "q")
    assert rec["layers"]["int8"] == 4
    scales = [t for t in onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph.initializer
              if t.name.endswith("_scales")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
    x = np.random.default_rng(3).standard_normal((2, H)).astype(np.float32)
    assert _rel(_run(tmp_path / "q", x, "onnxruntime"), _run(src, x, "onnxruntime")) < 0.03


def test_a_small_model_stays_in_one_file(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(5).standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
                              [numpy_helper.from_array(w, "w")])
    (tmp_path / "src").mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9),
                    str(tmp_path / "src" / "model.onnx"))
    rec = compress_component(tmp_path / "src", WeightFormat("int8", group_size=16), tmp_path / "q")
    assert rec["layers"]["int8"] == 1 and sorted(p.name for p in (tmp_path / "q").iterdir()) == ["model.onnx"]
    x = np.ones((1, 16), np.float32)
    assert _rel(_run(tmp_path / "q", x, "onnxruntime"), x @ w) < 0.02


def test_bad_formats_and_inputs(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="unknown weight format 'int3'"):
        WeightFormat("int3")
    with pytest.raises(OptionError, match="power of two >= 16"):
        WeightFormat("int4", group_size=48)
    with pytest.raises(OptionError, match="between 0 and 1"):
        WeightFormat("int4", ratio=1.5)
    with pytest.raises(QuantizationError, match="no such ONNX model"):
        compress_component(tmp_path, WeightFormat("int8"), tmp_path / "out")


def test_family_defaults_per_component() -> None:
    from enginekit.export.diffusion.families import get_family

    flux = ["text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder"]
    assert get_family("flux").weight_formats(flux, "int4") == {
        "text_encoder": "fp32", "text_encoder_2": "int8", "transformer": "int4", "vae_decoder": "fp32",
        "vae_encoder": "fp32"}
    sd3 = ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"]
    assert get_family("sd3").weight_formats(sd3, "int8")["text_encoder_3"] == "int8"
    assert get_family("sd3").weight_formats(sd3, "fp16") == {
        "text_encoder": "fp16", "text_encoder_2": "fp16", "text_encoder_3": "fp16", "transformer": "fp16",
        "vae_decoder": "fp32"}
    assert get_family("sd15").weight_formats(["text_encoder", "unet", "vae_decoder"], "int4") == {
        "text_encoder": "fp32", "unet": "int4", "vae_decoder": "fp32"}


# -- pipelines: the image gate and both backends' compile -------------------------------

PIPELINES = [("tiny-sd15", "int8"), ("tiny-sd15", "int4"), ("tiny-flux", "int8"), ("tiny-flux", "int4")]
# tiny-flux int4 by default (the format with the most to check, on the family it is for); the rest under -m slow.
_PARAMS = [pytest.param(n, m, id=f"{n}-{m}", marks=[] if (n, m) == ("tiny-flux", "int4") else [pytest.mark.slow])
           for n, m in PIPELINES]


@pytest.mark.parametrize("name,mode", _PARAMS)
def test_compressed_pipeline_passes_the_image_gate_and_compiles_compressed(
        tiny_pipelines: dict, tmp_path: Path, name: str, mode: str) -> None:
    from click.testing import CliRunner

    import enginekit
    from enginekit.app.cli import cli
    from enginekit.export.diffusion.compress import compress_pipeline
    from enginekit.quant.diffusion import BUDGETS
    from enginekit.quant.diffusion_gate import GateSpec

    out = tmp_path / "c"
    manifest = compress_pipeline(tiny_pipelines[(name, "onnx")], out, WeightFormat(mode, group_size=16),
                                 gate=GateSpec())
    denoiser = manifest.task_config["denoiser"]
    comps = manifest.components
    assert comps[denoiser].precision == mode and comps["vae_decoder"].precision == "fp32"
    assert comps["text_encoder"].precision == "fp32"
    if name == "tiny-flux":  # T5 int8 whenever the denoiser is compressed
        assert comps["text_encoder_2"].precision == "int8"
    rec = comps[denoiser].quantization
    assert {k: rec[k] for k in ("format", "group_size", "sym")} == {"format": mode, "group_size": 16, "sym": False}
    assert "higher_precision" in rec and rec["layers"][mode] > 0
    q = manifest.quantization
    assert q["weight_format"] == mode and q["components"][denoiser]["format"] == mode
    fid = manifest.fidelity
    floor_psnr, floor_ssim = BUDGETS[mode]
    assert fid["vs_parent"]["psnr_db"] >= floor_psnr and fid["vs_parent"]["ssim"] >= floor_ssim
    assert fid["budget"]["min_psnr_db"] == floor_psnr
    compressed = sum(f.size for f in comps[denoiser].files)
    parent = enginekit.manifest.read_manifest(tiny_pipelines[(name, "onnx")]).components[denoiser]
    assert compressed < sum(f.size for f in parent.files)

    runner = CliRunner()
    for backend in ("onnxruntime", "openvino"):
        if not _available(backend):
            continue
        target = tmp_path / backend
        res = runner.invoke(cli, ["compile", str(out), "-b", backend, "-o", str(target)])
        assert res.exit_code == 0, res.output
        folder = target / Path(comps[denoiser].entry).parent
        if backend == "openvino":
            # Compressed weights run in the device's precision (bf16 on AMX); float components stay f32.
            per_comp = enginekit.manifest.read_manifest(target).target["component_inference_precision"]
            assert per_comp[denoiser] == "default" and "vae_decoder" not in per_comp
            xml = (folder / "model.xml").read_text()
            assert ('element_type="u4"' in xml) == (mode == "int4") and 'element_type="u8"' in xml
            weights = (folder / "model.bin").stat().st_size
        else:
            assert "MatMulNBits" in _ops(folder)
            weights = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))
        # The weights stay compressed: the engine is about the compressed component's size.
        assert weights < 1.2 * compressed, (backend, weights, compressed)
        with enginekit.load(target, device="cpu") as pipe:
            image = pipe("a boat", num_inference_steps=2, seed=3, output_type="np").images
        assert image.shape[-1] == 3 and np.isfinite(image).all()


def test_bf16_pipeline_passes_the_gate_and_compiles_at_half_size(tiny_pipelines: dict, tmp_path: Path) -> None:
    """A bf16 denoiser (and T5, as asked): the gate's bf16 budget holds; ONNX Runtime runs the casts,
    OpenVINO's IR keeps the weights at half of fp32's bytes (in fp16, where bf16 values are exact)."""
    import enginekit
    from enginekit.api import compile_artifact
    from enginekit.export.diffusion.compress import compress_pipeline
    from enginekit.quant.diffusion import BUDGETS
    from enginekit.quant.diffusion_gate import GateSpec

    parent = tiny_pipelines[("tiny-flux", "onnx")]
    manifest = compress_pipeline(parent, tmp_path / "c", WeightFormat("bf16"), gate=GateSpec())
    assert {n: c.precision for n, c in manifest.components.items()} == {
        "text_encoder": "fp32", "text_encoder_2": "bf16", "transformer": "bf16", "vae_decoder": "fp32",
        "vae_encoder": "fp32"}
    assert manifest.fidelity["vs_parent"]["psnr_db"] >= BUDGETS["bf16"][0]
    fp32_ir = tiny_pipelines[("tiny-flux", "openvino")] / "transformer" / "model.bin"
    images = []
    for backend in ("onnxruntime", "openvino"):
        if not _available(backend):
            continue
        target = tmp_path / backend
        compile_artifact(tmp_path / "c", backend, target)
        if backend == "openvino":
            assert (target / "transformer" / "model.bin").stat().st_size < 0.6 * fp32_ir.stat().st_size
        with enginekit.load(target, device="cpu") as pipe:
            images.append(pipe("a boat", num_inference_steps=2, seed=3, output_type="np").images)
    assert all(np.isfinite(i).all() for i in images)


def test_compress_pipeline_refusals(tiny_pipelines: dict, tmp_path: Path) -> None:
    from enginekit.export.diffusion.compress import compress_pipeline

    sd15 = tiny_pipelines[("tiny-sd15", "onnx")]
    with pytest.raises(QuantizationError, match="unknown component 'vae'"):
        compress_pipeline(sd15, tmp_path / "x", "int8", {"vae": "fp16"})
    manifest = compress_pipeline(sd15, tmp_path / "q", WeightFormat("int8", group_size=16),
                                 {"text_encoder": "int8"})
    assert manifest.components["text_encoder"].precision == "int8"
    assert manifest.components["text_encoder"].quantization["group_size"] == 16
    with pytest.raises(QuantizationError, match="already quantized"):
        compress_pipeline(tmp_path / "q", tmp_path / "qq", "int4")
    assert not (tmp_path / "x").exists() and not (tmp_path / "qq").exists()
    assert manifest.provenance["compress"]["peak_rss_bytes"] > 0


def test_export_compressed_removes_the_float_export(tiny_pipelines: dict, tmp_path: Path) -> None:
    import shutil

    from enginekit.export.diffusion.compress import export_compressed

    seen: list[Path] = []

    def export(folder: Path) -> None:  # stands in for export_pipeline: the float artifact, on disk
        seen.append(folder)
        shutil.copytree(tiny_pipelines[("tiny-flux", "onnx")], folder)

    out = tmp_path / "flux-int4"
    manifest = export_compressed(export, out, WeightFormat("int4", group_size=16))
    assert manifest.components["transformer"].precision == "int4"
    assert (out / "manifest.json").is_file() and not seen[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flux-int4"]


# -- memory ------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    import onnx, onnxruntime  # the baseline: everything the pass imports
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer
    from enginekit.export.compress import WeightFormat, compress_component, written_files

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    base = status("VmRSS")
    record = compress_component(Path(sys.argv[1]), WeightFormat(sys.argv[2], group_size=128), Path(sys.argv[3]))
    print(json.dumps({"baseline": base, "hwm": status("VmHWM"), "layers": record["layers"]}))
""")


def _wide_component(folder: Path, layers: int, side: int) -> int:
    """``layers`` MatMuls of side x side fp32 weights in one external data file, written
    one weight at a time (this process never holds more than one)."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True)
    nodes, inits = [], []
    nbytes = side * side * 4
    with open(folder / "model.onnx.data", "wb") as f:
        for i in range(layers):
            w = np.random.default_rng(i).standard_normal((side, side), dtype=np.float32) * 0.02
            f.write(w.tobytes())
            del w
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[side, side],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", "model.onnx.data"), ("offset", str(i * nbytes)), ("length", str(nbytes))):
                e = t.external_data.add()
                e.key, e.value = key, value
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"mm{i}"))
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["b", side])],
                              [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, ["b", side])], inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9),
                    str(folder / "model.onnx"))
    return layers * nbytes


def test_peak_memory_follows_the_largest_tensor_not_the_model(tmp_path: Path) -> None:
    """About 1 GiB of fp32 weights (16 x 64 MiB) compressed to int4 in a subprocess: its peak
    resident memory stays a few tensors above what it had after its imports."""
    side, layers = 4096, 16
    total = _wide_component(tmp_path / "src", layers, side)
    assert total >= 1 << 30
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "src"), "int4", str(tmp_path / "q")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["layers"]["int4"] == layers - 2 and got["layers"]["int8"] == 2
    tensor = side * side * 4
    grew = got["hwm"] - got["baseline"]
    # One weight mapped, its contiguous copy for the kernel at most, and the packed result.
    assert grew < 4 * tensor, f"peak grew {grew / 2**20:.0f} MiB over the baseline for {total / 2**20:.0f} MiB"
    assert (tmp_path / "q" / "model.onnx.data").stat().st_size < total / 6


def test_cli_export_with_a_weight_format(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from enginekit.app.cli import cli

    out = tmp_path / "sd15-int8"
    res = CliRunner().invoke(cli, ["export", "tiny-sd15", "-o", str(out), "--weight-format",
                                   "int4", "--group-size", "16", "--ratio", "0.8", "--sym", "--component",
                                   "text_encoder=int8", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    comps = data["components"]
    assert comps["unet"]["precision"] == "int4" and comps["text_encoder"]["precision"] == "int8"
    assert comps["vae_decoder"]["precision"] == "fp32"
    rec = comps["unet"]["quantization"]
    assert (rec["group_size"], rec["ratio"], rec["sym"]) == (16, 0.8, True)
    # Judged twice: the float export against diffusers, the compressed pipeline against the float one.
    fid = data["fidelity"]
    assert fid["export"]["image"]["psnr_db"] >= 40.0
    assert fid["vs_parent"]["psnr_db"] >= fid["budget"]["min_psnr_db"]
    assert [p.name for p in tmp_path.iterdir()] == ["sd15-int8"]
    res = CliRunner().invoke(cli, ["export", "tiny-sd15", "-o", str(tmp_path / "x"), "--weight-format", "int4",
                                   "--group-size", "48"])
    assert res.exit_code == 2 and "power of two" in res.output and not (tmp_path / "x").exists()


# -- compressed while streamed ---------------------------------------------------------------

def test_streamed_compression_gives_what_compressing_the_float_export_gives(tiny_pipelines: dict,
                                                                            tmp_path: Path) -> None:
    """``export --streaming --weight-format int4``: each weight compressed as it is drawn, no float
    copy on disk; the same packed weights, scales and graph as compressing today's float export, and
    the same outputs (T5, exported by TorchScript in memory but by dynamo when streamed, to rounding)."""
    from click.testing import CliRunner

    from enginekit.app.cli import cli
    from enginekit.export.diffusion.compress import compress_pipeline
    from enginekit.manifest import read_manifest
    from enginekit.runtimes.onnxruntime import run_onnx_file

    from .test_streaming import _canonical

    out = tmp_path / "s"
    res = CliRunner().invoke(cli, ["export", "tiny-flux", "-o", str(out), "--streaming", "--weight-format", "int4",
                                   "--group-size", "16", "--component", "text_encoder=fp16"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no float scratch folder
    streamed = read_manifest(out)
    parent = tiny_pipelines[("tiny-flux", "onnx")]
    ref = compress_pipeline(parent, tmp_path / "r", WeightFormat("int4", group_size=16), {"text_encoder": "fp16"})
    assert streamed.provenance["streamed"] is True
    q = streamed.quantization
    assert q["method"] == "weight-compression" and q["stage"] == "export (streamed)" and q["weight_format"] == "int4"
    assert {n: c.precision for n, c in streamed.components.items()} == \
        {n: c.precision for n, c in ref.components.items()} == \
        {"text_encoder": "fp16", "text_encoder_2": "int8", "transformer": "int4", "vae_decoder": "fp32",
         "vae_encoder": "fp32"}
    exporters = read_manifest(parent).provenance["exporters"]
    rng = np.random.default_rng(0)
    for name, comp in streamed.components.items():
        got, want = streamed.components[name].quantization, ref.components[name].quantization
        if comp.precision in ("int4", "int8"):
            assert got["layers"] == want["layers"] and got["group_size"] == 16, name
        if exporters[name] == "dynamo":  # the same graph: the same tensors bit for bit
            (a, nodes_a), (b, nodes_b) = _canonical(out / comp.entry), _canonical(tmp_path / "r" / comp.entry)
            assert nodes_a == nodes_b and sorted(a) == sorted(b), name
            for key in b:
                assert np.array_equal(a[key], b[key]), (name, key)
        feeds = {}
        for key, spec in read_manifest(parent).components[name].fidelity["inputs"].items():
            feeds[key] = (rng.integers(0, 100, size=spec["shape"]).astype(np.int64) if spec["dtype"] == "int64"
                          else rng.standard_normal(spec["shape"]).astype(np.float32))
        out_s, out_r = run_onnx_file(out / comp.entry, feeds), run_onnx_file(tmp_path / "r" / comp.entry, feeds)
        for key in out_r:
            np.testing.assert_allclose(out_s[key], out_r[key], rtol=0, atol=1e-4 * float(np.abs(out_r[key]).max()),
                                       err_msg=f"{name}.{key}")
