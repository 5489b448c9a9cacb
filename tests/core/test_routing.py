"""The task axis is routed once, in the task registry: a task registered at run time
gets its own quantize and bench, the CLI reaches them through the library, and an
unknown task or a stage a task lacks is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from enginekit import stages
from enginekit.app.cli import cli
from enginekit.artifact import atomic_artifact, make_component, write_manifest
from enginekit.errors import OptionError, UnknownTaskError, UnsupportedStageError
from enginekit.manifest import Manifest, TensorSpec, read_manifest
from enginekit.registry import TaskStages, expect_stage, register_task, stage, task_stages, unregister_task

FAKE = "test-routing-fake"
CALLS: list[tuple[str, Any]] = []


class FakeTask:
    @classmethod
    def from_artifact(cls, components: Any, manifest: Manifest, path: Path, **options: Any) -> FakeTask:
        return cls()


def fake_quantize(artifact: Path, out: Path, options: stages.QuantizeOptions, *, on_step: Any) -> Manifest:
    CALLS.append(("quantize", options))
    stages.refuse(options, ("method",), lambda wrong: f"{', '.join(wrong)}: not for {FAKE}")
    parent = read_manifest(artifact)
    return parent.replace(quantization={"method": options.method})


def fake_bench(paths: list[Path], options: stages.BenchOptions, *, check_only: bool = False) -> list[dict[str, Any]]:
    CALLS.append(("bench-check" if check_only else "bench", [p.name for p in paths]))
    return [] if check_only else [{"engine": {"name": p.name}, "runs": options.runs} for p in paths]


def _artifact(out: Path, task: str) -> Path:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with atomic_artifact(out) as tmp:
        onnx.save(model, str(tmp / "model.onnx"))
        comp = make_component(tmp, "model", "model.onnx", ["model.onnx"], [TensorSpec("x", "float32", (1, 2))],
                              [TensorSpec("y", "float32", (1, 2))])
        write_manifest(tmp, Manifest(kind="onnx", task=task, family="test", components={"model": comp}))
    return out


@pytest.fixture(autouse=True)
def fake_task() -> Any:
    register_task(FAKE, f"{__name__}:FakeTask",
                  TaskStages(quantize=f"{__name__}:fake_quantize", bench=f"{__name__}:fake_bench"))
    CALLS.clear()
    yield
    unregister_task(FAKE)


def test_a_task_registered_at_run_time_gets_its_own_quantize_and_bench(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "a", FAKE)
    manifest = stages.quantize(art, tmp_path / "q", stages.QuantizeOptions(method="fake-int8"))
    assert manifest.quantization == {"method": "fake-int8"}
    records = stages.bench([art], stages.BenchOptions(runs=3))
    assert records == [{"engine": {"name": "a"}, "runs": 3}]
    # every group is checked before any is timed
    assert [c[0] for c in CALLS] == ["quantize", "bench-check", "bench"]


def test_the_cli_reaches_the_fake_task_through_the_library(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "a", FAKE)
    res = CliRunner().invoke(cli, ["quantize", str(art), "-o", str(tmp_path / "q"), "-m", "fake-int8", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["quantization"] == {"method": "fake-int8"}
    options = CALLS[0][1]
    assert options.given() == ["method"]  # what the user left unset stays unset
    # an option the task does not take is a usage error, in one line
    res = CliRunner().invoke(cli, ["quantize", str(art), "-o", str(tmp_path / "q"), "-m", "x", "--min-psnr", "30"])
    assert res.exit_code == 2 and f"--min-psnr: not for {FAKE}" in res.output and "Traceback" not in res.output


def test_a_stage_the_task_lacks_is_one_line(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "a", FAKE)
    with pytest.raises(UnsupportedStageError, match=f"evaluate does not apply to {FAKE} artifacts"):
        stages.evaluate(art)
    res = CliRunner().invoke(cli, ["evaluate", str(art)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1].startswith("Error: evaluate does not apply to")


def test_an_unknown_task_is_one_line(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "a", "no-such-task")
    with pytest.raises(UnknownTaskError, match="task 'no-such-task' is not supported"):
        stage("no-such-task", "quantize")
    for args in (["quantize", str(art), "-o", str(tmp_path / "q"), "-m", "fp16"],
                 ["bench", str(art), "--store", str(tmp_path / "r.jsonl")]):
        res = CliRunner().invoke(cli, args)
        lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
        assert res.exit_code == 1 and len(lines) == 1, res.output
        assert lines[0].startswith("Error: task 'no-such-task' is not supported"), res.output


def test_an_implementation_called_with_another_tasks_artifact_says_where_to_go() -> None:
    with pytest.raises(UnsupportedStageError, match="use enginekit.stages.quantize"):
        expect_stage("text-to-image", "quantize", "enginekit.quant.api:quantize_classifier")
    expect_stage("image-classification", "quantize", "enginekit.quant.api:quantize_classifier")


def test_refuse_names_flags_in_field_order() -> None:
    opts = stages.OptimizeOptions(without_t5=True, prompts=("a",), budget_cosine=0.9)
    with pytest.raises(OptionError, match="--budget-cosine, --prompts, --no-t5"):
        stages.refuse(opts, (), lambda wrong: ", ".join(wrong))


def test_built_in_tasks_route_every_stage_they_have_to_an_importable_target() -> None:
    for task in ("image-classification", "text-to-image"):
        routed = task_stages(task)
        for name in ("quantize", "optimize", "bench", "export"):
            assert callable(stage(task, name)), (task, name, getattr(routed, name))


def test_inspect_shows_an_artifact_of_a_task_nobody_registered(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "a", "no-such-task")
    res = CliRunner().invoke(cli, ["inspect", str(art)])
    assert res.exit_code == 0, res.output
    assert "no-such-task" in res.output and "digest" in res.output


def test_optimize_refuses_before_any_work(tmp_path: Path) -> None:
    # the task's options are checked first, then its own inputs: nothing is exported
    for args, message in ((["default", "--prompts", str(tmp_path / "none.txt")], "--prompts is for diffusion"),
                          (["tiny-sd15", "--prompts", str(tmp_path / "none.txt")], "--prompts: cannot read")):
        res = CliRunner().invoke(cli, ["optimize", *args, "-o", str(tmp_path / "o")])
        assert res.exit_code == 2 and message in res.output, res.output
        assert not (tmp_path / "o").exists()
