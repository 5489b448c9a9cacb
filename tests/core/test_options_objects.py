"""Functions with many settings take one typed options object (a frozen dataclass); the
fields may still be given by name, and a name that is no field is a one-line error."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from enginekit.app.build import BuildRequest, build_engine
from enginekit.errors import OptionError
from enginekit.quant.api import QuantizeRequest, quantize_artifact
from enginekit.quant.base import QuantOptions
from enginekit.stages import with_fields


@pytest.mark.parametrize("func", [build_engine, quantize_artifact])
def test_the_options_object_keeps_the_signature_short(func) -> None:
    assert len(inspect.signature(func).parameters) <= 6


def test_named_fields_replace_the_request_s() -> None:
    base = QuantizeRequest(backend="openvino", calibration="photos", options=QuantOptions(group_size=16))
    got = with_fields(QuantizeRequest, base, {"calibration": "builtin", "overwrite": True})
    assert (got.backend, got.calibration, got.overwrite, got.options.group_size) == ("openvino", "builtin", True, 16)
    assert with_fields(BuildRequest, None, {"height": 64}) == BuildRequest(height=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.backend = "onnxruntime"  # type: ignore[misc]


def test_a_misspelt_field_is_one_line_naming_it(tmp_path: Path) -> None:
    # Refused before anything is read: the artifact does not even exist.
    with pytest.raises(OptionError, match=r"BuildRequest has no field 'hieght' \(it takes: .*height"):
        build_engine(tmp_path / "none", "onnxruntime", tmp_path / "out", hieght=64)
    with pytest.raises(OptionError, match=r"QuantizeRequest has no field 'calibraton'"):
        quantize_artifact(tmp_path / "none", tmp_path / "out", "fp16", calibraton="photos")
    with pytest.raises(OptionError, match="must be a QuantizeRequest, got BuildRequest"):
        quantize_artifact(tmp_path / "none", tmp_path / "out", "fp16", BuildRequest())
