"""``enginekit optimize`` on diffusion pipelines: tiny SD 1.5 and tiny FLUX at 64x64, 3 steps.

One end-to-end run per pipeline (module-scoped), then assertions on its report:
every candidate's fate, a candidate that really produces a worse image missing the
budget, the pick being the fastest per step of those within it, the pick loading
and generating; plus the refusals and the nothing-written path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from enginekit.app.optimize_pipeline import (
    QUANTIZE_MISSING,
    PipelineCandidate,
    PipelineOptimizeConfig,
    optimize_pipeline,
    plan_pipeline_candidates,
    select,
)
from enginekit.errors import InputError, UnknownBackendError

from .conftest import installed_backends

pytestmark = pytest.mark.skipif(not {"onnxruntime", "openvino"} <= set(installed_backends()),
                                reason="needs ONNX Runtime and OpenVINO")

SIZE, STEPS = 64, 3


def _quantize_available() -> bool:
    try:
        from enginekit.quant.diffusion import quantize_pipeline  # noqa: F401
    except ImportError:
        return False
    return True


def _wrong_vae_scale(onnx_dir: Path, dest: Path) -> Path:
    """A real engine whose images are wrong: OpenVINO fp32, its VAE scaling factor quadrupled
    in the manifest (latents reach the decoder at a quarter of their scale)."""
    from enginekit.app.build import build_engine
    from enginekit.artifact import write_manifest
    from enginekit.manifest import read_manifest

    build_engine(onnx_dir, "openvino", dest, height=SIZE, width=SIZE, batch=1,
                 options={"inference_precision": "f32"}, overwrite=True)
    m = read_manifest(dest)
    section = dict(m.task_config)
    section["vae_scaling_factor"] = float(section["vae_scaling_factor"]) * 4
    write_manifest(dest, m.replace(task_config=section))
    return dest


WRONG = PipelineCandidate("openvino-fp32-wrong-vae-scale", "openvino", {"*": "fp32"},
                          description="test: a VAE scale 4x off", builder=_wrong_vae_scale)


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("opt-sd15")
    config = PipelineOptimizeConfig(precisions=("fp32", "fp16", "int8"), min_psnr=25.0, size=SIZE, steps=STEPS,
                                    prompts=("a red fox in the snow",), seeds=(0, 1))
    report = optimize_pipeline("tiny-sd15", root / "best", config, work_dir=root / "work", extra_candidates=[WRONG])
    return report, root / "best"


def test_every_candidate_has_a_fate_and_the_fastest_within_budget_is_kept(sd15_run: tuple[dict, Path]) -> None:
    report, out = sd15_run
    fates = {oc["candidate"]["name"]: oc for oc in report["candidates"]}
    expected = {"onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-fp16-unet", "onnxruntime-int8-unet",
                "openvino-fp32", "openvino-fp16", "openvino-fp16-unet", "openvino-int8-unet", WRONG.name}
    assert set(fates) == expected
    assert all(oc["status"] in ("picked", "slower", "missed", "failed", "skipped") for oc in fates.values())
    # The engine with the wrong VAE scale really draws another image: it misses, with its numbers.
    wrong = fates[WRONG.name]
    assert wrong["status"] == "missed"
    assert wrong["fidelity"]["psnr_db_min"] < 25.0
    assert "PSNR" in wrong["reason"] and "< 25 dB" in wrong["reason"]
    # Float engines are within 25 dB of diffusers on the same latents.
    for name in ("onnxruntime-fp32", "openvino-fp32"):
        assert fates[name]["status"] in ("picked", "slower"), fates[name]["reason"]
        assert fates[name]["fidelity"]["psnr_db_min"] > 40
        assert len(fates[name]["fidelity"]["images"]) == 2
    # Quantized candidates run when quantize_pipeline is installed, and say why not otherwise.
    for name in ("onnxruntime-int8-unet", "openvino-int8-unet", "onnxruntime-fp16", "onnxruntime-fp16-unet"):
        if _quantize_available():
            assert fates[name]["status"] != "skipped"
        else:
            assert fates[name]["status"] == "skipped" and QUANTIZE_MISSING in fates[name]["reason"]
    within = [oc for oc in fates.values() if oc["status"] in ("picked", "slower")]
    best = min(within, key=lambda oc: oc["timing"]["step_ms"])
    assert report["picked"] == best["candidate"]["name"] and best["status"] == "picked"
    assert all("slower per step than" in oc["reason"] for oc in within if oc is not best)
    # Speed-ups against diffusers timed in the same run, and per component against the backend's fp32.
    base = report["baseline"]
    assert base["step_ms"] > 0 and base["before"]["step_ms"] > 0 and base["after"]["step_ms"] > 0
    assert best["speedup_step"] == pytest.approx(base["step_ms"] / best["timing"]["step_ms"])
    fp16 = fates["openvino-fp16-unet"]
    if fp16.get("timing"):
        assert fp16["vs_fp32"]["candidate"] == "openvino-fp32"
        assert set(fp16["vs_fp32"]["components"]) >= {"unet", "vae_decoder", "text_encoder"}
    # The report on disk says the same, with the rebuild commands.
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["picked"] == report["picked"]
    md = (out / "report.md").read_text()
    for name in expected:
        assert f"| {name} |" in md
    assert "missed budget" in md and "Per-component time per call" in md
    assert report["rebuild"][0] == "enginekit export tiny-sd15 -o onnx"
    assert report["rebuild"][-1].startswith("enginekit compile ")


def test_the_pick_loads_and_generates(sd15_run: tuple[dict, Path]) -> None:
    import enginekit
    from enginekit.manifest import read_manifest

    report, out = sd15_run
    m = read_manifest(out)
    assert m.provenance["optimize"]["candidate"] == report["picked"]
    assert m.fidelity["image"]["psnr_db_min"] >= 25
    with enginekit.load(out, device="cpu") as pipe:
        images = pipe("a lighthouse", num_inference_steps=2, height=SIZE, width=SIZE, seed=3,
                      output_type="np").images
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all() and images.std() > 0


def test_the_rebuild_commands_parse(sd15_run: tuple[dict, Path]) -> None:
    """Each printed command is one the CLI accepts (its options parse; nothing runs)."""
    import shlex

    from enginekit.app.cli import cli

    report, _ = sd15_run
    for line in report["rebuild"]:
        if not line.startswith("enginekit "):
            continue
        args = shlex.split(line)[1:]
        ctx = cli.make_context("enginekit", list(args), resilient_parsing=True)
        sub = cli.get_command(ctx, args[0])
        sub.make_context(args[0], args[1:])  # raises click.UsageError on an unknown flag


def test_flux_through_the_cli(tmp_path: Path) -> None:
    from enginekit.app.cli import cli

    out = tmp_path / "best"
    result = CliRunner().invoke(cli, ["optimize", "tiny-flux", "-o", str(out), "--backends", "openvino",
                                      "--precisions", "fp32,fp16", "--size", str(SIZE), "--steps", str(STEPS),
                                      "--min-psnr", "25", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["denoiser"] == "transformer" and report["scheduler"] == "flow-euler"
    names = {oc["candidate"]["name"]: oc["status"] for oc in report["candidates"]}
    assert set(names) == {"openvino-fp32", "openvino-fp16", "openvino-fp16-transformer"}
    assert report["picked"] in names and names[report["picked"]] == "picked"
    assert (out / "report.md").is_file()


def test_no_candidate_meets_the_budget_writes_nothing(tmp_path: Path) -> None:
    from enginekit.app.cli import cli

    out = tmp_path / "best"
    result = CliRunner().invoke(cli, ["optimize", "tiny-sd15", "-o", str(out), "--backends", "openvino",
                                      "--precisions", "fp32", "--size", str(SIZE), "--steps", "2",
                                      "--min-psnr", "500"])
    assert result.exit_code != 0
    assert "no candidate met the budget" in result.output
    assert "openvino-fp32: missed (missed budget: PSNR" in result.output
    assert "| openvino-fp32 |" in result.output  # the table comes with the refusal
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("best")]


def test_selection_skips_the_fastest_when_it_misses() -> None:
    def oc(name: str, step: float, psnr: float) -> dict:
        return {"candidate": {"name": name}, "status": "judged", "reason": "",
                "fidelity": {"psnr_db_min": psnr}, "timing": {"step_ms": step}}

    outcomes = [oc("fast-but-wrong", 1.0, 12.0), oc("middle", 2.0, 35.0), oc("slow", 3.0, 60.0),
                {"candidate": {"name": "q"}, "status": "skipped", "reason": QUANTIZE_MISSING}]
    assert select(outcomes, 30.0) == "middle"
    assert [o["status"] for o in outcomes] == ["missed", "picked", "slower", "skipped"]
    assert "12.00 dB < 30 dB" in outcomes[0]["reason"]
    again = [oc("a", 1.0, 12.0), oc("b", 2.0, 20.0)]
    assert select(again, 30.0) is None and all(o["status"] == "missed" for o in again)


def test_plan_covers_the_assemblies() -> None:
    comps = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    plan = plan_pipeline_candidates(["onnxruntime", "openvino"], ["fp32", "fp16", "int8", "int4"], comps, "unet",
                                    size=64, cpu_flags=["amx_bf16"])
    by = {c.name: c for c in plan}
    assert {"openvino-fp32", "openvino-fp16", "openvino-fp16-unet", "openvino-int8-unet", "openvino-int4-unet",
            "onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8-unet"} <= set(by)
    mixed = by["openvino-fp16-unet"]
    assert mixed.compile_options["keep_fp32"] == ["text_encoder", "vae_decoder", "vae_encoder"]
    assert mixed.compile_options["component_inference_precision"]["vae_decoder"] == "f32"
    assert by["openvino-int8-unet"].precisions == {"unet": "int8", "*": "fp32"}
    only = plan_pipeline_candidates(["openvino"], ["fp16"], comps, "unet", size=64)
    assert {c.family for c in only} == {"fp16"}


@pytest.mark.parametrize(("args", "message"), [
    (["tiny-sd15", "--backends", "tensorrt-nope"], "unknown backend"),
    (["tiny-sd15", "--precisions", "fp8"], "precisions must be among"),
    (["tiny-sd15", "--budget-agreement", "0.9"], "--budget-agreement is for classifiers"),
    (["tiny-sd15", "--steps", "1"], "--steps must be 2-200"),
    (["default", "--min-psnr", "30"], "--min-psnr is for diffusion pipelines"),
    (["default", "--prompts", "x.txt"], "--prompts is for diffusion pipelines"),
    (["default", "--no-t5"], "--no-t5 is for diffusion pipelines"),
    (["tiny-sd15", "--no-t5"], "--no-t5 is for SD3/SD3.5"),
])
def test_bad_input_is_refused_before_any_work(tmp_path: Path, args: list[str], message: str) -> None:
    from enginekit.app.cli import cli

    out = tmp_path / "best"
    result = CliRunner().invoke(cli, ["optimize", *args, "-o", str(out)])
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists()


def test_library_refusals(tmp_path: Path) -> None:
    with pytest.raises(UnknownBackendError):
        optimize_pipeline("tiny-sd15", tmp_path / "o", PipelineOptimizeConfig(backends=("nope",)))
    with pytest.raises(InputError, match="no held-out prompts"):
        optimize_pipeline("tiny-sd15", tmp_path / "o", PipelineOptimizeConfig(prompts=()))
    assert not (tmp_path / "o").exists()


def test_component_inference_precision_is_checked_and_recorded(sd15_run: tuple[dict, Path], tmp_path: Path) -> None:
    from enginekit.api import compile_artifact
    from enginekit.errors import BackendError
    from enginekit.manifest import read_manifest
    from enginekit.runtimes.base import CompileOptions

    _, out = sd15_run
    onnx_dir = out.parent / "work" / "onnx"
    with pytest.raises(BackendError, match="names 'nope'"):
        compile_artifact(onnx_dir, "openvino", tmp_path / "a",
                         CompileOptions(extra={"component_inference_precision": {"nope": "f32"}}))
    with pytest.raises(BackendError, match="must be one of"):
        compile_artifact(onnx_dir, "openvino", tmp_path / "b",
                         CompileOptions(extra={"component_inference_precision": {"unet": "f64"}}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    picked = read_manifest(out)
    if "fp16-unet" in picked.provenance["optimize"]["candidate"]:
        assert picked.target["component_inference_precision"]["vae_decoder"] == "f32"
