"""The TensorRT backend on a machine without TensorRT or a GPU: what can be proven here.

- optimization profiles parsed and checked (trtexec's syntax; min <= opt <= max; every dynamic
  input covered; a pipeline's buckets from its sizes);
- the plan's identity in the manifest, and a plan for another TensorRT version or compute
  capability refused before ``tensorrt`` is imported (an import guard proves it);
- TensorRT missing: one line with the install hint; the registry lists the backend with why;
- the builder's and runner's call sequences against a stand-in ``tensorrt`` whose "engine" runs
  the ONNX on ONNX Runtime (structure, not TensorRT: ``test_tensorrt_gpu.py`` runs the real one).
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import enginekit
from enginekit.engine import CompileOptions
from enginekit.errors import BackendError, BackendUnavailableError, ShapeError
from enginekit.manifest import Component, Manifest, TensorSpec
from enginekit.runtimes import tensorrt as trt_backend
from enginekit.runtimes.tensorrt import TensorRTBackend, TensorRTOptions, plan_profiles
from enginekit.runtimes.tensorrt_build import BuildSettings, build_plan
from enginekit.runtimes.tensorrt_plan import PlanIdentity, check_plan
from enginekit.runtimes.tensorrt_profiles import ShapeRange, component_profiles, parse_shapes, pick_profile

from ..conftest import make_photo
from . import fake_tensorrt

PIXELS = TensorSpec("pixel_values", "float32", ("batch", 3, 32, 32))


# -- profiles -----------------------------------------------------------------------------------

def test_trtexec_shapes_parse_into_one_profile() -> None:
    p = parse_shapes("pixel_values:1x3x384x384/8x3x384x384/32x3x384x384,mask:1x4")
    assert p["pixel_values"] == ShapeRange((1, 3, 384, 384), (8, 3, 384, 384), (32, 3, 384, 384))
    assert p["mask"].static and p["mask"].min == (1, 4)
    assert parse_shapes("unet:sample:2x4x64x64")["unet:sample"].opt == (2, 4, 64, 64)


@pytest.mark.parametrize("text, words", [
    ("x:4x3/2x3/8x3", "min <= opt <= max"),
    ("x:1x3/1x3x2/1x3", "different ranks"),
    ("x:1x3/2x3", "MIN/OPT/MAX or one"),
    ("x:1,3", "must read NAME:MIN/OPT/MAX"),
    ("x:a1x3", "not a shape"),
    ("x:1x3,x:2x3", "twice"),
])
def test_bad_shapes_are_one_line_errors(text: str, words: str) -> None:
    with pytest.raises(BackendError, match=words) as err:
        parse_shapes(text)
    assert "\n" not in str(err.value)


def test_every_dynamic_input_is_covered_and_fixed_dims_kept() -> None:
    inputs = [PIXELS, TensorSpec("mask", "float32", ("batch", "tokens"))]
    with pytest.raises(BackendError, match="'mask'.*dynamic and no profile covers"):
        component_profiles("model", inputs, [parse_shapes("pixel_values:1x3x32x32/2x3x32x32/4x3x32x32")], [])
    with pytest.raises(BackendError, match="axis 2 is fixed at 32"):
        component_profiles("model", [PIXELS], [parse_shapes("pixel_values:1x3x64x64")], [])
    with pytest.raises(BackendError, match="does not take"):
        component_profiles("model", [PIXELS], [parse_shapes("pixels:1x3x32x32")], [])
    with pytest.raises(BackendError, match="dimension 'tokens'"):
        component_profiles("model", inputs, [], [{"batch": (1, 1, 8)}])
    # The text gives one input, the dimension ranges the other.
    [profile] = component_profiles("model", inputs, [parse_shapes("pixel_values:1x3x32x32/2x3x32x32/4x3x32x32")],
                                   [{"batch": (1, 1, 8), "tokens": (4, 8, 16)}])
    assert profile["mask"] == ShapeRange((1, 4), (1, 8), (8, 16))
    # A component prefix keeps a pipeline's inputs apart; other components' entries are skipped.
    assert component_profiles("vae", [PIXELS], [parse_shapes("unet:pixel_values:1x3x32x32")],
                              [{"batch": (1, 2, 3)}])[0]["pixel_values"].max == (3, 3, 32, 32)
    assert component_profiles("model", [TensorSpec("x", "float32", (1, 3))], [], []) == []


def test_the_profile_covering_a_call_is_picked_or_refused() -> None:
    profiles = [{"x": ShapeRange((1, 8), (1, 8), (1, 8))}, {"x": ShapeRange((1, 16), (2, 16), (4, 16))}]
    assert pick_profile(profiles, {"x": (1, 8)}) == 0
    assert pick_profile(profiles, {"x": (3, 16)}) == 1
    with pytest.raises(ShapeError, match=r"covers x 5x16 \(built for: x 1x8/1x8/1x8; x 1x16/2x16/4x16\)"):
        pick_profile(profiles, {"x": (5, 16)})


def _classifier_manifest() -> Manifest:
    comp = Component("model", "model.onnx", (), (PIXELS,), (TensorSpec("logits", "float32", ("batch", 4)),))
    return Manifest(kind="onnx", task="image-classification", family="vit", components={"model": comp})


def test_a_classifier_gets_batch_1_to_32_unless_told() -> None:
    m = _classifier_manifest()
    assert plan_profiles(m, TensorRTOptions())["model"][0]["pixel_values"].text() == "1x3x32x32/1x3x32x32/32x3x32x32"
    assert plan_profiles(m, TensorRTOptions(static_batch=8))["model"][0]["pixel_values"].static
    two = plan_profiles(m, TensorRTOptions(shapes=("pixel_values:1x3x32x32", "pixel_values:2x3x32x32/8x3x32x32/16x3x32x32")))
    assert [p["pixel_values"].opt[0] for p in two["model"]] == [1, 8]
    with pytest.raises(BackendError, match="dim_ranges names 'unet'"):
        plan_profiles(m, TensorRTOptions(dim_ranges={"unet": {"batch": "1/1/2"}}))


#: The text-to-image section of the built-in tiny SD 1.5 (what its export writes).
SD15 = {"pipeline": "StableDiffusionPipeline", "denoiser": "unet", "layout": "clip",
        "tokenizers": {"tokenizer": {"kind": "clip", "file": "tokenizer/tokenizer.json", "max_length": 77}},
        "scheduler": {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000}, "latent_channels": 4,
        "vae_scale_factor": 8, "vae_scaling_factor": 0.18215, "prediction_type": "epsilon", "sample_size": 64,
        "vae_precision": "fp32", "default_size": 512,
        "text_encoders": [{"component": "text_encoder", "tokenizer": "tokenizer", "hidden_state": "last",
                           "use_pooled": False}]}


def _sd15() -> Manifest:
    def comp(name: str, inputs: list[tuple[str, tuple]]) -> Component:
        return Component(name, f"{name}/model.onnx", (), tuple(TensorSpec(n, "float32", s) for n, s in inputs),
                         (TensorSpec("out", "float32", ("batch",)),))

    components = {
        "text_encoder": comp("text_encoder", [("input_ids", ("batch", "sequence"))]),
        "unet": comp("unet", [("sample", ("batch", 4, "latent_height", "latent_width")), ("timestep", ("batch",)),
                              ("encoder_hidden_states", ("batch", "sequence", 768))]),
        "vae_decoder": comp("vae_decoder", [("latent_sample", ("batch", 4, "latent_height", "latent_width"))]),
        "vae_encoder": comp("vae_encoder", [("sample", ("batch", 3, "height", "width"))]),
    }
    return Manifest(kind="onnx", task="text-to-image", family="sd15", components=components, task_config=SD15)


def test_a_pipeline_gets_size_buckets_from_its_default_size() -> None:
    profiles = {k: v[0] for k, v in plan_profiles(_sd15(), TensorRTOptions()).items()}
    # 256..1024 around SD 1.5's 512, up to 4 images (8 UNet rows with CFG), one row at the least.
    assert profiles["unet"]["sample"].text() == "1x4x32x32/2x4x64x64/8x4x128x128"
    assert profiles["unet"]["encoder_hidden_states"].text() == "1x77x768/2x77x768/8x77x768"
    assert profiles["vae_decoder"]["latent_sample"].text() == "1x4x32x32/1x4x64x64/4x4x128x128"
    assert profiles["vae_encoder"]["sample"].text() == "1x3x256x256/1x3x512x512/1x3x1024x1024"
    assert profiles["text_encoder"]["input_ids"].min == (1, 77) and profiles["text_encoder"]["input_ids"].max[0] >= 8


def test_height_width_batch_make_one_static_bucket_and_keep_the_vae_fp32() -> None:
    from enginekit.runtimes.tasks.pipeline_compile import compile_options

    extra = compile_options(_sd15(), "tensorrt", "fp16", 768, 512, 2)
    assert extra["keep_fp32"] == ["vae_decoder", "vae_encoder"]  # the family says its VAE overflows fp16
    profiles = plan_profiles(_sd15(), TensorRTOptions.parse("tensorrt", extra))
    assert profiles["unet"][0]["sample"].static and profiles["unet"][0]["sample"].opt == (4, 4, 96, 64)
    assert profiles["vae_decoder"][0]["latent_sample"].opt == (2, 4, 96, 64)
    assert profiles["text_encoder"][0]["input_ids"].min == (1, 77)  # prompts keep a free batch


# -- identity and refusal -----------------------------------------------------------------------

def test_check_plan_names_both_versions_and_capabilities() -> None:
    built = PlanIdentity("10.8.0.43", "NVIDIA A10", "8.6")
    check_plan("p", built, PlanIdentity("10.8.0.43", "NVIDIA A10G", "8.6"))  # same generation: runs
    with pytest.raises(BackendError) as err:
        check_plan("unet/model.plan", built, PlanIdentity("10.13.0.35", "NVIDIA H100", "9.0"))
    text = str(err.value)
    assert "\n" not in text and "10.8.0.43" in text and "10.13.0.35" in text and "8.6" in text and "9.0" in text


class _NoTensorRT(importlib.abc.MetaPathFinder):
    """Fails any import of tensorrt or cuda-python while installed."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] in ("tensorrt", "cuda"):
            raise AssertionError(f"{name} was imported")
        return None


@pytest.fixture()
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> tuple:
    """The stand-in tensorrt module and CUDA, installed; the backend sees one GPU."""
    trt = fake_tensorrt.make_module()
    cuda = fake_tensorrt.FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "enginekit.runtimes.tensorrt_cuda", cuda)
    import enginekit.runtimes

    monkeypatch.setattr(enginekit.runtimes, "tensorrt_cuda", cuda, raising=False)
    monkeypatch.setattr(TensorRTBackend, "unavailable_reason", classmethod(lambda cls: None))
    monkeypatch.setattr(TensorRTBackend, "devices", lambda self: ["cuda:0"])
    here = PlanIdentity(trt.__version__, "NVIDIA H100 80GB HBM3", "9.0")
    monkeypatch.setattr(trt_backend, "local_identity", lambda device: here)
    monkeypatch.setattr(trt_backend, "installed_tensorrt_version", lambda: trt.__version__)
    return trt, cuda


def test_compile_records_the_plans_identity_and_load_runs_it(fake_trt: tuple, exported: dict[str, Path],
                                                             tmp_path: Path) -> None:
    from enginekit.api import compile_artifact

    trt, cuda = fake_trt
    manifest = compile_artifact(exported["timm"], "tensorrt", tmp_path / "trt", CompileOptions(
        device="cuda", extra={"builder_optimization_level": 5, "workspace_mib": 512}))
    t = manifest.target
    assert (t["tensorrt_version"], t["gpu_name"], t["compute_capability"]) == ("10.13.0.35", "NVIDIA H100 80GB HBM3",
                                                                                "9.0")
    assert t["profiles"]["model"] == [{"pixel_values": {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32],
                                                        "max": [32, 3, 32, 32]}}]
    source = json.loads((exported["timm"] / "manifest.json").read_text())["components"]["model"]["files"][0]
    assert t["onnx_sha256"]["model"] == source["sha256"] and t["precision"] == "fp32"
    assert t["strongly_typed"] and not t["version_compatible"] and manifest.component().entry == "model.plan"
    names = [c[0] for c in fake_tensorrt.CALLS]
    assert ("create_network", 1 << 5) in fake_tensorrt.CALLS  # STRONGLY_TYPED
    assert names.index("config.add_optimization_profile") < names.index("build_serialized_network")
    assert ("config.set_memory_pool_limit", "WORKSPACE", 512 * 2**20) in fake_tensorrt.CALLS
    assert ("config.builder_optimization_level", 5) in fake_tensorrt.CALLS
    photos = [make_photo((96, 80), seed) for seed in range(3)]
    reference = enginekit.load(exported["timm"], device="cpu").predict(photos)
    with enginekit.load(tmp_path / "trt", device="cuda") as model:
        got = model.predict(photos)
    assert [p.label for p in got] == [p.label for p in reference]
    assert np.allclose([p.score for p in got], [p.score for p in reference], atol=1e-5)
    assert ("deserialize_cuda_engine", False) in fake_tensorrt.CALLS  # host code refused


def test_a_plan_for_another_tensorrt_or_gpu_is_refused_before_tensorrt_is_imported(
        fake_trt: tuple, exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from enginekit.api import compile_artifact

    compile_artifact(exported["timm"], "tensorrt", tmp_path / "trt", CompileOptions(device="cuda"))
    monkeypatch.setattr(trt_backend, "local_identity", lambda device: PlanIdentity("11.0.0.12", "NVIDIA B200", "10.0"))
    for name in [m for m in sys.modules if m.split(".")[0] in ("tensorrt", "cuda")]:
        monkeypatch.delitem(sys.modules, name)
    guard = _NoTensorRT()
    monkeypatch.setattr(sys, "meta_path", [guard, *sys.meta_path])
    with pytest.raises(BackendError) as err:
        enginekit.load(tmp_path / "trt", device="cuda")
    assert "10.13.0.35" in str(err.value) and "11.0.0.12" in str(err.value) and "10.0" in str(err.value)
    assert "tensorrt" not in sys.modules and "\n" not in str(err.value)


def test_the_builders_parser_errors_and_timing_cache(fake_trt: tuple, tmp_path: Path) -> None:
    trt, _ = fake_trt
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    profiles = [{"x": ShapeRange((1, 4), (2, 4), (8, 4))}, {"x": ShapeRange((16, 4), (16, 4), (16, 4))}]
    plan = build_plan(trt, tmp_path / "m.onnx", profiles, BuildSettings(timing_cache=cache))
    assert plan.startswith(b"FAKEPLAN:")
    assert ("config.create_timing_cache", b"old") in fake_tensorrt.CALLS
    assert ("config.set_timing_cache", False) in fake_tensorrt.CALLS
    assert cache.read_bytes() == b"old+timings"  # written back after the build
    assert ("profile.set_shape", "x", (16, 4), (16, 4), (16, 4)) in fake_tensorrt.CALLS
    assert sum(c[0] == "config.add_optimization_profile" for c in fake_tensorrt.CALLS) == 2
    assert not any(c[0] == "config.set_flag" for c in fake_tensorrt.CALLS)  # no VERSION_COMPATIBLE unless asked
    trt.parser_errors = ["Unsupported data type FLOAT8E4M3FN", "Input B must be constant"]
    with pytest.raises(BackendError) as err:
        build_plan(trt, tmp_path / "m.onnx", [], BuildSettings())
    assert str(err.value) == ("tensorrt's ONNX parser refused m.onnx: node /blocks.0/attn/MatMul (MatMul): "
                              "Unsupported data type FLOAT8E4M3FN; node /blocks.0/attn/MatMul (MatMul): "
                              "Input B must be constant")


def test_static_profiles_replay_a_cuda_graph(fake_trt: tuple, exported: dict[str, Path], tmp_path: Path) -> None:
    from enginekit.api import compile_artifact, load_runner

    _, cuda = fake_trt
    compile_artifact(exported["timm"], "tensorrt", tmp_path / "trt", CompileOptions(
        device="cuda", extra={"shapes": ["pixel_values:2x3x32x32"]}))
    runner, _ = load_runner(tmp_path / "trt", device="cuda")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    first, second = runner.run({"pixel_values": x}), runner.run({"pixel_values": x * 2})
    assert (cuda.graphs, cuda.launches) == (1, 1)  # captured on the first call, replayed on the second
    assert not np.allclose(first["logits"], second["logits"])
    with pytest.raises(ShapeError, match="no optimization profile"):
        runner.run({"pixel_values": x[:1]})
    runner.close()


# -- missing TensorRT, the registry, the options ------------------------------------------------

def test_missing_tensorrt_is_one_line_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from enginekit.registry import backend_names, get_backend

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt fails here, as without it
    assert "tensorrt" in backend_names()
    reason = TensorRTBackend.unavailable_reason()
    assert reason is not None and "pip install 'enginekit[tensorrt]'" in reason
    with pytest.raises(BackendUnavailableError, match=r"^backend 'tensorrt' cannot run here: .*enginekit\[tensorrt\]"):
        get_backend("tensorrt")
    with pytest.raises(BackendUnavailableError) as err:
        trt_backend._import_trt()
    assert "\n" not in str(err.value) and "pip install 'enginekit[tensorrt]'" in str(err.value)


def test_doctor_lists_tensorrt_as_unavailable_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from enginekit.app.inspect import doctor_report

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    report = doctor_report()
    [entry] = [b for b in report["backends"] if b["name"] == "tensorrt"]
    assert entry["installed"] is False and "TensorRT is not installed" in entry["reason"]
    rows = {r["name"]: r for r in report["gpu"]}
    assert {"gpu", "driver", "cuda", "tensorrt", "onnxruntime CUDAExecutionProvider"} <= set(rows)
    assert all(r["usable"] or r["detail"] for r in rows.values())  # each unusable part says why


def test_options_refuse_int8_as_a_flag_and_out_of_range_levels() -> None:
    be = TensorRTBackend()
    m = _classifier_manifest()
    with pytest.raises(BackendError, match="compile --int8"):
        be._check(TensorRTOptions(precision="int8"), m)
    with pytest.raises(BackendError, match="0 to 5"):
        be._check(TensorRTOptions(builder_optimization_level=7), m)
    with pytest.raises(BackendError, match="unknown option 'fp16_layers'"):
        TensorRTOptions.parse("tensorrt", {"fp16_layers": 1})


def test_the_cli_names_what_is_missing_and_whose_flags_are_whose(monkeypatch: pytest.MonkeyPatch,
                                                                  exported: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from enginekit.app.cli import cli

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    art = exported["timm"]
    runner = CliRunner()
    result = runner.invoke(cli, ["compile", str(art), "-b", "tensorrt", "-d", "cuda", "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and "pip install 'enginekit[tensorrt]'" in result.output
    result = runner.invoke(cli, ["compile", str(art), "-b", "onnxruntime", "--shapes", "x:1x3", "-o",
                                 str(tmp_path / "o")])
    assert result.exit_code != 0 and "--shapes is a tensorrt option" in result.output
    result = runner.invoke(cli, ["compile", str(art), "-b", "tensorrt", "--fp16", "--bf16", "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and "--fp16 and --bf16 disagree" in result.output
