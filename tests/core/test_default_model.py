"""The shipped default model (enginekit/models/digits-vit) and its digits data helpers."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from enginekit.errors import InputError, SourceError
from enginekit.models.digits import DEFAULT_MODEL_DIR, LABELS, digits_split, write_digit_images

pytest.importorskip("sklearn", reason="the digits data needs scikit-learn")

MAX_WEIGHTS_BYTES = 5 * 1024 * 1024


def _card() -> str:
    return (DEFAULT_MODEL_DIR / "README.md").read_text(encoding="utf-8")


def _card_accuracy() -> float:
    """The held-out accuracy (percent) the training script wrote into the model card."""
    match = re.search(r"Held-out accuracy: \*\*([0-9.]+)%\*\*", _card())
    assert match, "the model card states no held-out accuracy"
    return float(match.group(1))


@pytest.fixture(scope="module")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digit_images(tmp_path_factory.mktemp("digits") / "test", split="test")


def test_shipped_folder_holds_the_timm_hub_files_and_a_card() -> None:
    names = sorted(p.name for p in DEFAULT_MODEL_DIR.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]
    weights = DEFAULT_MODEL_DIR / "model.safetensors"
    assert 0 < weights.stat().st_size < MAX_WEIGHTS_BYTES
    # The card was written with these weights, not left over from another run.
    assert hashlib.sha256(weights.read_bytes()).hexdigest() in _card()


def test_config_labels_and_preprocessing() -> None:
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text(encoding="utf-8"))
    assert config["label_names"] == list(LABELS) == [str(d) for d in range(10)]
    assert config["num_classes"] == 10
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32]
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == ("bilinear", 1.0, "center")
    assert cfg["mean"] == cfg["std"] == [0.5, 0.5, 0.5]


def test_loads_with_timm_and_meets_the_card_accuracy(test_images: Path) -> None:
    pytest.importorskip("timm")
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model(f"local-dir:{DEFAULT_MODEL_DIR}", pretrained=True).eval()
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    # Read back the PNG folder write_digit_images made: the path evaluate takes.
    paths = sorted(test_images.glob("*/*.png"))
    labels = torch.tensor([int(p.parent.name) for p in paths])
    inputs = []
    for path in paths:
        with Image.open(path) as image:
            inputs.append(transform(image.convert("RGB")))
    with torch.no_grad():
        logits = model(torch.stack(inputs))
    assert logits.shape == (360, 10)
    accuracy = 100 * float((logits.argmax(1) == labels).float().mean())
    assert accuracy >= _card_accuracy() - 0.5


def test_digits_split_is_fixed_and_stratified() -> None:
    x_train, y_train, x_test, y_test = digits_split()
    assert x_train.shape == (1437, 8, 8) and x_test.shape == (360, 8, 8)
    assert x_train.dtype == x_test.dtype == np.uint8 and x_train.max() == 255
    assert np.bincount(y_test, minlength=10).min() >= 35
    again = digits_split()
    assert all(np.array_equal(a, b) for a, b in zip((x_train, y_train, x_test, y_test), again))


def test_write_digit_images_one_folder_per_class(test_images: Path) -> None:
    from PIL import Image

    _, _, x_test, y_test = digits_split()
    counts = {d.name: len(list(d.glob("*.png"))) for d in test_images.iterdir()}
    assert counts == {label: int(n) for label, n in zip(LABELS, np.bincount(y_test, minlength=10))}
    first = test_images / LABELS[y_test[0]] / "0000.png"
    with Image.open(first) as image:
        assert (image.mode, image.size) == ("L", (8, 8))
        assert np.array_equal(np.asarray(image), x_test[0])
    assert not list(test_images.parent.glob(".*partial*"))


def test_write_digit_images_limit_and_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "few"
    out.mkdir()  # an empty folder is fine to fill
    write_digit_images(out, split="train", limit=20)
    assert sum(1 for _ in out.glob("*/*.png")) == 20
    assert sorted(d.name for d in out.iterdir()) == list(LABELS)


def test_write_digit_images_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        write_digit_images(out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("kwargs", [{"split": "val"}, {"limit": 0}, {"limit": 2.5}])
def test_write_digit_images_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(InputError):
        write_digit_images(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_digits_split_without_sklearn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SourceError, match=r"enginekit\[data\]"):
        digits_split()


def test_digits_module_never_imports_torch() -> None:
    code = "import sys, enginekit.models.digits; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
