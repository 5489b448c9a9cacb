"""``enginekit optimize`` on diffusion pipelines: tiny SD 1.5 and tiny FLUX at 64x64, 3 steps.

One end-to-end run per pipeline (module-scoped), then assertions on its report:
every candidate's fate, a candidate that really produces a worse image missing the
budget, the pick being the fastest per step of those within it, the pick loading
and generating; plus the refusals and the nothing-written path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
from enginekit.bench.pipeline_images import TimingRule
from enginekit.errors import InputError, UnknownBackendError

from ..conftest import installed_backends

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
                                    prompts=("a red fox in the snow",), seeds=(0, 1),
                                    timing=TimingRule(min_samples=8, budget_s=2.0))
    report = optimize_pipeline("tiny-sd15", root / "best", config, work_dir=root / "work", extra_candidates=[WRONG])
    return report, root / "best"


def test_every_candidate_has_a_fate_and_the_fastest_within_budget_is_kept(sd15_run: tuple[dict, Path]) -> None:
    report, out = sd15_run
    fates = {oc["candidate"]["name"]: oc for oc in report["candidates"]}
    expected = {"onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-fp16-unet", "onnxruntime-int8-unet",
                "openvino-fp32", "openvino-fp16", "openvino-fp16-unet", "openvino-int8-unet", WRONG.name}
    assert {n for n in fates if "+" not in n} == expected
    # The step caches ran on the fastest uncached candidates within the budget (per step, and per image),
    # each on its base's own engine.
    within = [oc for n, oc in fates.items() if "+" not in n and oc["status"] in ("picked", "slower")]
    fastest = min(within, key=lambda oc: oc["timing"]["step_ms"])["candidate"]["name"]
    fastest_image = min(within, key=lambda oc: oc["timing"]["image_ms"])["candidate"]["name"]
    cached = {n: oc for n, oc in fates.items() if "+" in n}
    assert set(cached) == {f"{b}+deepcache:{n}" for b in (fastest, fastest_image) for n in (2, 3)}
    for oc in cached.values():
        base = oc["candidate"]["base"]
        assert oc["path"] == fates[base]["path"] and base in (fastest, fastest_image)
    # Judged at whole cache cycles after the first step: 3 steps for deepcache:2, 4 for deepcache:3.
    assert "steps" not in cached[f"{fastest}+deepcache:2"] and cached[f"{fastest}+deepcache:3"]["steps"] == 4
    assert cached[f"{fastest}+deepcache:3"].get("speedup_image") is None
    # The pick: the fastest per step, or one tied with it on the step (inside its interval) whose whole
    # image is faster; every other candidate within the budget is slower.
    expected |= set(cached)
    assert all(oc["status"] in ("picked", "slower", "missed", "failed", "skipped", "unreliable")
               for oc in fates.values())
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
    picked = fates[report["picked"]]
    assert picked["status"] == "picked"
    if picked is not best:
        assert "tied per step" in picked["reason"] and picked["timing"]["step_ms"] <= best["timing"]["step_ci_ms"][1]
        assert picked["timing"]["image_ms"] <= best["timing"]["image_ms"]
        best = picked
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
    commands = [line for line in report["rebuild"] if not line.startswith("#")]
    assert commands[-1].startswith("enginekit compile ")
    if "+" in report["picked"]:  # a cached pick says how it runs
        assert report["rebuild"][-1].startswith("# run with step cache deepcache:")


def test_the_picks_step_holds_its_denoisers_call_and_every_figure_says_its_samples(
        sd15_run: tuple[dict, Path]) -> None:
    """The picked candidate's step time is at least its UNet's call time (a step contains that call),
    and the report (JSON and markdown) says how many samples each figure took, under which rule."""
    report, out = sd15_run
    best = next(oc for oc in report["candidates"] if oc["status"] == "picked")
    t = best["timing"]
    assert t["denoiser"] == report["denoiser"] == "unet"
    assert t["step_ms"] >= t["denoiser_step_ms"]
    if not best["candidate"].get("cache"):  # a cached pick's step averages full and cut calls
        assert t["step_ms"] >= t["components_ms"]["unet"]
    assert "impossible" not in t
    for oc in report["candidates"]:
        timing = oc.get("timing")
        if not timing:
            continue
        if oc["candidate"].get("cache"):
            # A cached step sample is a cycle's mean (one full call, the rest the cut UNet's): it holds
            # the denoiser's calls in it, but not a full call each.
            assert timing["cycle"] == int(oc["candidate"]["cache"].split(":")[1])
            assert timing["step_ms"] >= timing["denoiser_step_ms"] and "impossible" not in timing
            assert timing["calls_per_image"]["unet#deepcache"] > 0
            continue
        # Every timed step holds its own UNet call: never impossible here, so nothing was re-measured.
        assert timing["measurements"] == 1 and timing["step_ms"] >= timing["components_ms"]["unet"]
        # 2 judged images x (STEPS - 1) timed steps, then repeats for time: at least the rule's minimum
        # unless its 2 s ran out first.
        assert timing["step_samples"] >= 2 * (STEPS - 1) and timing["image_samples"] >= 2
        assert timing["step_samples"] >= 8 or timing["timing_s"] >= 2.0
        assert timing["component_samples"]["unet"] == timing["step_samples"]
        assert timing["calls_per_image"]["unet"] == STEPS
    base = report["baseline"]
    # The baseline is the faster of diffusers before the engines (2 images) and after them (1 image):
    # which one depends on the machine's load during the run.
    assert base["before"]["step_samples"] >= 2 * (STEPS - 1) and base["after"]["step_samples"] >= STEPS - 1
    assert base["step_samples"] in (base["before"]["step_samples"], base["after"]["step_samples"])
    assert base["step_ms"] == min(base["before"]["step_ms"], base["after"]["step_ms"])
    assert report["timing_rule"]["min_samples"] == 8 and "confidence interval" in report["timing_rule"]["text"]
    md = (out / "report.md").read_text()
    assert "samples steps / images" in md and report["timing_rule"]["text"] in md
    row = next(line for line in md.splitlines() if line.startswith(f"| {best['candidate']['name']} |"))
    assert f"| {t['step_samples']} / {t['image_samples']} |" in row
    assert f"{t['components_ms']['unet']:.1f} ({t['component_samples']['unet']})" in md


def test_the_pick_loads_and_generates(sd15_run: tuple[dict, Path]) -> None:
    import enginekit
    from enginekit.manifest import read_manifest

    report, out = sd15_run
    m = read_manifest(out)
    assert m.provenance["optimize"]["candidate"] == report["picked"]
    assert m.fidelity["image"]["psnr_db_min"] >= 25
    picked = next(oc for oc in report["candidates"] if oc["status"] == "picked")
    # A cached pick runs cached by default (what it was judged with); an uncached one does not.
    assert m.task_config.get("default_cache") == picked["candidate"].get("cache")
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


@pytest.mark.slow  # optimize on FLUX end to end: minutes; the candidates, fates and budget are tested on SD 1.5 by default
def test_flux_through_the_cli(tmp_path: Path) -> None:
    from enginekit.app.cli import cli

    out = tmp_path / "best"
    result = CliRunner().invoke(cli, ["optimize", "tiny-flux", "-o", str(out), "--backends", "openvino",
                                      "--precisions", "fp32,fp16", "--size", str(SIZE), "--steps", str(STEPS),
                                      "--min-psnr", "25", "--duration", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["denoiser"] == "transformer" and report["scheduler"] == "flow-euler"
    names = {oc["candidate"]["name"]: oc["status"] for oc in report["candidates"]}
    assert set(names) == {"openvino-fp32", "openvino-fp16", "openvino-fp16-transformer"}
    assert report["picked"] in names and names[report["picked"]] == "picked"
    assert (out / "report.md").is_file()
    assert report["timing_rule"]["budget_s"] == 2.0  # --duration bounds the repeated timing of each side


def test_no_candidate_meets_the_budget_writes_nothing(tmp_path: Path) -> None:
    from enginekit.app.cli import cli

    out = tmp_path / "best"
    result = CliRunner().invoke(cli, ["optimize", "tiny-sd15", "-o", str(out), "--backends", "openvino",
                                      "--precisions", "fp32", "--size", str(SIZE), "--steps", "2",
                                      "--min-psnr", "500", "--duration", "1"])
    assert result.exit_code != 0
    assert "no candidate met the budget" in result.output
    assert "openvino-fp32: missed (missed budget: PSNR" in result.output
    assert "| openvino-fp32 |" in result.output  # the table comes with the refusal
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("best")]


def test_a_cache_that_misses_the_budget_is_not_picked(tmp_path: Path) -> None:
    """One float engine (ONNX Runtime fp32: diffusers' image to float rounding, far above 80 dB) and
    DeepCache on it (which moves the tiny image to the 40s of dB), judged with an 80 dB budget: the
    cached candidate misses, with its numbers, and the slower uncached engine is picked."""
    config = PipelineOptimizeConfig(backends=("onnxruntime",), precisions=("fp32",), min_psnr=80.0, size=SIZE,
                                    steps=STEPS, prompts=("a red fox in the snow",), seeds=(0, 1),
                                    caches=("deepcache:2",), timing=TimingRule(min_samples=4, budget_s=0.5))
    report = optimize_pipeline("tiny-sd15", tmp_path / "best", config, work_dir=tmp_path / "work")
    fates = {oc["candidate"]["name"]: oc for oc in report["candidates"]}
    assert set(fates) == {"onnxruntime-fp32", "onnxruntime-fp32+deepcache:2"}
    assert fates["onnxruntime-fp32"]["fidelity"]["psnr_db_min"] > 80.0
    cached = fates["onnxruntime-fp32+deepcache:2"]
    assert cached["status"] == "missed" and cached["fidelity"]["psnr_db_min"] < 80.0
    assert "missed budget: PSNR" in cached["reason"]
    assert report["picked"] == "onnxruntime-fp32"


def test_a_transformer_pipeline_tries_taylorseer_and_skips_deepcache(tmp_path: Path) -> None:
    """SD3's transformer has no deep features: a DeepCache asked for is skipped (said once), and
    TaylorSeer runs on the engine, judged and timed at whole cycles after its full warm-up steps."""
    config = PipelineOptimizeConfig(backends=("onnxruntime",), precisions=("fp32",), min_psnr=10.0, size=SIZE,
                                    steps=STEPS, prompts=("a red fox in the snow",), seeds=(0,),
                                    caches=("deepcache:2", "taylorseer:2,before=2"),
                                    timing=TimingRule(min_samples=4, budget_s=0.5))
    said: list[str] = []
    report = optimize_pipeline("tiny-sd3", tmp_path / "best", config, work_dir=tmp_path / "work", on_step=said.append)
    fates = {oc["candidate"]["name"]: oc for oc in report["candidates"]}
    assert set(fates) == {"onnxruntime-fp32", "onnxruntime-fp32+taylorseer:2,before=2"}
    assert any("deepcache:2: skipped" in msg and "no deep features" in msg for msg in said)
    cached = fates["onnxruntime-fp32+taylorseer:2,before=2"]
    assert cached["steps"] == 4 and cached["status"] in ("picked", "slower", "missed")  # 2 full + 1 cycle of 2
    assert cached["timing"]["cycle"] == 2 and cached["fidelity"]["psnr_db_min"] > 10.0


def test_cache_steps_make_whole_cycles() -> None:
    from enginekit.app.optimize_pipeline_plan import cache_steps

    assert [cache_steps(s, "deepcache:3") for s in (2, 4, 5, 7)] == [4, 4, 7, 7]
    assert [cache_steps(s, "taylorseer:2") for s in (2, 4, 5, 6, 7)] == [5, 5, 5, 7, 7]
    assert cache_steps(28, "taylorseer:3,before=6") == 30 and cache_steps(4, "none") == 4


def test_selection_breaks_a_step_tie_on_the_whole_image() -> None:
    """A step median inside the fastest's 95% interval is a tie the timing cannot order: the faster
    whole image wins it (an f32 VAE shows there). Outside the interval, the step decides."""
    def oc(name: str, step: float, image: float, ci: list | None = None, steps: int | None = None) -> dict:
        out = {"candidate": {"name": name}, "status": "judged", "reason": "", "fidelity": {"psnr_db_min": 40.0},
               "timing": {"step_ms": step, "image_ms": image, "step_ci_ms": ci or [step * 0.95, step * 1.05]}}
        if steps:
            out["steps"] = steps
        return out

    outcomes = [oc("fast-step", 100.0, 5000.0, [95.0, 110.0]), oc("tied", 104.0, 3000.0),
                oc("slow-step", 120.0, 1000.0), oc("other-steps", 101.0, 10.0, steps=5)]
    assert select(outcomes, 30.0) == "tied"
    assert "tied per step with fast-step" in outcomes[1]["reason"]
    assert [o["status"] for o in outcomes] == ["slower", "picked", "slower", "slower"]


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
    (["tiny-sd15", "--caches", "fastcache"], "unknown cache 'fastcache'"),
    (["default", "--caches", "none"], "--caches is for diffusion pipelines"),
    (["default", "--streaming"], "--streaming is for diffusion pipelines"),
    (["tiny-sd15", "--caches", "taylorseer:2,speed=1"], "unknown option 'speed=1'"),
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


# ---------------------------------------------------------------- timing honesty (no engine needed)


def _fake_generation(step: float, call: float, n: int = 6) -> Any:
    from enginekit.bench.pipeline_images import Generation

    return Generation(step_ms=[step] * n, image_ms=[10 * step] * 2, component_ms={"unet": [call] * n},
                      denoiser="unet", denoiser_step_ms=[call] * n, calls={"unet": n + 2})


def test_an_impossible_step_time_is_measured_again_and_never_picked() -> None:
    """A step contains the denoiser's call: a step median below the call's is impossible. It is
    measured again (up to REMEASURES times), flagged in the timing, and select never picks it."""
    from enginekit.app.optimize_pipeline import REMEASURES, measure_timing

    tries: list[int] = []

    def broken() -> Any:
        tries.append(1)
        return _fake_generation(step=1.94, call=7.52)

    gen, timing = measure_timing(broken)
    assert len(tries) == 1 + REMEASURES and timing["measurements"] == 1 + REMEASURES
    assert "impossible" in timing["impossible"] and "7.52 ms" in timing["impossible"]
    assert len(timing["remeasured_because"]) == REMEASURES

    # Impossible once, then right: the second measurement is kept, and nothing is flagged.
    seq = iter([_fake_generation(1.0, 5.0), _fake_generation(6.0, 5.0)])
    _, fixed = measure_timing(lambda: next(seq))
    assert fixed["measurements"] == 2 and "impossible" not in fixed and fixed["step_ms"] == 6.0

    def oc(name: str, timing: dict) -> dict:
        return {"candidate": {"name": name}, "status": "judged", "reason": "", "fidelity": {"psnr_db_min": 50.0},
                "timing": timing}

    outcomes = [oc("fast-but-impossible", timing), oc("honest", fixed)]
    assert select(outcomes, 30.0) == "honest"
    assert outcomes[0]["status"] == "unreliable" and "measured 3 times" in outcomes[0]["reason"]


def test_steps_and_denoiser_calls_are_timed_on_the_same_steps() -> None:
    """_generate_all pairs each timed step with the denoiser's calls inside it (the first step's
    call is left out of both), and repeats the jobs for time only until the rule is met."""
    from enginekit.bench.pipeline_images import Generation, ImageJob, TimingRule, _generate_all, median_spread

    clock = iter(range(10**6))
    calls: dict[str, list[tuple[float, float]]] = {}

    def call(job: ImageJob, steps: int, marks: list[float]) -> np.ndarray:
        calls.setdefault("text_encoder", []).append((next(clock), next(clock)))
        for i in range(steps):
            start = next(clock)
            end = start + (50 if i == 0 else 3)  # the first step's call is slow (lazy set-up)
            for _ in range(end - start):
                next(clock)
            calls.setdefault("unet", []).append((start, end))
            marks.append(next(clock))
        return np.zeros((1, 8, 8, 3))

    plan: Any = type("Plan", (), {"steps": 3})()  # _generate_all reads only the step count
    gen = Generation(denoiser="unet")
    _generate_all(call, [ImageJob("a", 0)], plan, gen, calls, warmup=True, rule=TimingRule(min_samples=8,
                                                                                           max_spread=1.0))
    assert len(gen.images) == 1 and gen.timing_images == 3  # 2 steps an image: 4 images for 8 samples
    assert len(gen.step_ms) == 8 and len(gen.denoiser_step_ms) == 8
    assert gen.component_ms["unet"] == [3e3] * 8  # never the first step's 50
    assert all(s >= d for s, d in zip(gen.step_ms, gen.denoiser_step_ms))
    assert gen.calls["unet"] == 12 and gen.summary()["calls_per_image"]["unet"] == 3
    assert median_spread([1.0] * 10) == 0 and median_spread([1.0, 2.0]) == float("inf")
