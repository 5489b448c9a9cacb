"""The peer comparison script (benchmarks/peers.py): the model folder the peers' older libraries
read as the hub's, the enginekit side's protocol on a tiny pipeline, a failed side, the table.

The peers themselves (optimum-intel, OpenVINO GenAI) need their own environment and are not
installed for the tests; the script's full run is in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from benchmarks import peers  # noqa: E402


def test_the_model_folder_reads_as_a_hub_folder(tmp_path: Path) -> None:
    """transformers 5 saves CLIP without its ``text_model.`` key prefix and the fast tokenizer alone;
    the peers' transformers 4 would start those weights from random and find no BPE files."""
    from safetensors import safe_open

    folder = tmp_path / "model"
    peers.build_model("tiny-sd15", folder, seed=0)
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").read_text().count("EulerDiscreteScheduler") == 1
    with safe_open(str(next((folder / "text_encoder").glob("*.safetensors"))), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") or k.startswith("text_projection") for k in keys)
    # This environment's transformers still loads it, to the same numbers as the seeded source.
    import diffusers
    import torch

    from enginekit.export.diffusion.sources import resolve_pipeline

    loaded = diffusers.DiffusionPipeline.from_pretrained(folder).text_encoder
    source = resolve_pipeline("tiny-sd15", random_weights=True, seed=0).pipeline.text_encoder
    ids = torch.tensor([[49406, 320, 736, 49407]])
    with torch.inference_mode():
        assert torch.equal(loaded(ids).last_hidden_state, source(ids).last_hidden_state)


def test_the_enginekit_side_times_a_cached_pick(tiny_pipelines: dict, tmp_path: Path) -> None:
    payload = {"prompt": peers.PROMPT, "negative": peers.NEGATIVE, "size": 64, "steps": 7, "guidance": 7.5,
               "seed": 0, "repeats": 1, "out_dir": str(tmp_path), "artifact": str(tiny_pipelines[("tiny-sd15", "onnx")]),
               "cache": "deepcache:3", "label": "pick"}
    result = peers._enginekit_child(payload)
    # The arithmetic, not the clock: on a tiny model under a loaded CPU, T7 - T1 can come out below zero.
    (one, whole), = result["pairs_s"]
    assert result["image_s"] == whole > 0 and result["one_step_s"] == one > 0
    assert result["step_s"] == pytest.approx((whole - one) / 6)
    assert np.load(result["image_path"]).shape == (64, 64, 3)


def test_a_side_that_fails_says_so_and_names_its_log(tmp_path: Path) -> None:
    result = peers.run_child([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
                             tmp_path / "side.log")
    assert result["error"].startswith("exit 3: ") and "boom" in result["error"]
    assert result["log"] == str(tmp_path / "side.log")


def test_the_table_divides_by_the_faster_peer_and_judges_the_target(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ref = rng.random((8, 8, 3), dtype=np.float32)
    paths = {}
    for name, noise in (("diffusers", 0.0), ("optimum", 0.001), ("genai", 0.001), ("pick", 0.005)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], np.clip(ref + noise * rng.standard_normal(ref.shape), 0, 1).astype(np.float32))
    side = lambda name, step, image: {"step_s": step, "image_s": image, "image_path": str(paths[name])}  # noqa: E731
    state = {"common": {"size": 512, "guidance": 7.5, "steps": 7, "repeats": 2},
             "hardware": {"cpu_model": "test CPU", "physical_cores": 2},
             "stages": {"diffusers": side("diffusers", 7.0, 60.0), "optimum": side("optimum", 1.8, 14.0),
                        "genai": side("genai", 1.6, 13.0),
                        "enginekit": {**side("pick", 0.8, 8.0), "cache": "deepcache:3"},
                        "optimize": {"picked": "openvino-fp16+deepcache:3"}}}
    table = peers.render(state)
    row = next(line for line in table.splitlines() if "optimize pick" in line)
    assert "| 0.800 | 8.00 | 8.75x |" in row and "| 2.00x | 1.62x |" in row
    assert "2.00x per step, 1.62x per image -> MET" in table
    state["stages"]["enginekit"]["image_s"] = 12.0
    assert "-> MISSED" in peers.render(state)
    json.dumps(state)  # what the script writes
