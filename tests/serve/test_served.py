"""The server asks the task registry how to serve a model (``TaskStages.serve``): a task
registered at run time with its own :class:`~enginekit.serve.served.Served` is listed,
described and inferred through KServe with no change to the server; a task without one is
listed as failed, in one line naming the tasks that can be served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra")

import enginekit  # noqa: E402
from enginekit.registry import TaskStages, register_task, unregister_task  # noqa: E402
from enginekit.serve.app import create_app  # noqa: E402
from enginekit.serve.served import Served  # noqa: E402
from enginekit.serve.settings import ServeSettings  # noqa: E402
from enginekit.serve.testing import AppRunner  # noqa: E402

SERVED_TASK, UNSERVED_TASK = "test-echo", "test-unserved"


class EchoModel:
    backend, device = "onnxruntime", "cpu"

    def __init__(self, task: str) -> None:
        self.task = task
        self.warmed = 0

    def close(self) -> None:
        pass


class ServedEcho(Served):
    def warm(self) -> None:
        self.obj.warmed += 1

    def start(self, settings: ServeSettings) -> None:
        pass

    def describe(self, settings: ServeSettings) -> dict[str, Any]:
        return {"echo": True, "warmed": self.obj.warmed}

    def kserve_io(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return ([{"name": "x", "datatype": "FP32", "shape": [-1]}], [{"name": "y", "datatype": "FP32", "shape": [-1]}])

    async def kserve_infer(self, request: Any, inputs: dict[str, np.ndarray], params: dict[str, Any]) -> dict:
        return {"y": inputs["x"] * 2}


@pytest.fixture
def echo_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    register_task(SERVED_TASK, f"{__name__}:EchoModel", TaskStages(serve=f"{__name__}:ServedEcho"))
    register_task(UNSERVED_TASK, f"{__name__}:EchoModel", TaskStages())
    tasks = {"echo": SERVED_TASK, "other": UNSERVED_TASK}
    monkeypatch.setattr(enginekit, "load", lambda path, **kw: EchoModel(tasks[Path(path).name]))
    yield
    unregister_task(SERVED_TASK)
    unregister_task(UNSERVED_TASK)


def test_a_task_is_served_through_its_registered_served_object(echo_tasks: None, tmp_path: Path) -> None:
    models = {}
    for name in ("echo", "other"):
        (tmp_path / name).mkdir()
        models[name] = tmp_path / name
    with AppRunner(create_app(models, ServeSettings())) as runner:  # both loaded or failed
        listed = {m["name"]: m for m in runner.get("/v2/models").json()["models"]}
        assert listed["echo"]["ready"] and listed["echo"]["echo"] is True and listed["echo"]["warmed"] == 1
        assert listed["echo"]["task"] == SERVED_TASK
        reason = listed["other"]["reason"]
        assert not listed["other"]["ready"] and "cannot be served" in reason and "\n" not in reason
        assert "image-classification" in reason and "text-to-image" in reason and SERVED_TASK in reason
        meta = runner.get("/v2/models/echo").json()
        assert meta["inputs"][0]["name"] == "x" and meta["outputs"][0]["name"] == "y"
        assert runner.get("/v2/models/echo/config").json()["max_batch_size"] == 0
        out = runner.post("/v2/models/echo/infer", json={"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]}]})
        assert out.status_code == 200, out.text
        assert out.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0]
        # the A1111 API lists only models whose task runs there
        assert runner.get("/sdapi/v1/sd-models").json() == []
        # classification applies to a classifier's logits only
        bad = runner.post("/v2/models/echo/infer", json={
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
            "outputs": [{"name": "y", "parameters": {"classification": 1}}]})
        assert bad.status_code == 400 and "classification" in bad.json()["error"]
