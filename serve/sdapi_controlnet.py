"""A1111's ControlNet extension arguments (``alwayson_scripts.controlnet.args``) mapped onto the
pipeline's ControlNets, for what they share.

Each enabled unit gives a ready-made control image (``image``, ``input_image``, or
``{"image": ...}``), its ``weight`` (the conditioning scale) and ``guidance_start``/``_end``.
Units map in order onto the ControlNets the artifact was exported with (``model`` names are not
matched: the artifact's ControlNets are the ones there are). The ``canny`` preprocessor runs
(OpenCV's Canny, :mod:`enginekit.runtimes.control_maps`) with ``threshold_a``/``threshold_b`` as
its low/high thresholds (A1111's defaults 100/200), on the image as sent (``processor_res`` is not
applied: the map is resized to the output as any control image is); any other (``openpose``,
``depth_midas``, ...) is refused in one line: give the map it would make.
"""

from __future__ import annotations

from typing import Any

from enginekit.serve.errors import ApiError

__all__ = ["controlnet_units"]

_NONE = (None, "", "none", "None")


def _image_field(unit: dict[str, Any], index: int) -> Any:
    value = unit.get("image", unit.get("input_image"))
    if isinstance(value, dict):
        value = value.get("image")
    if value is None:
        raise ApiError(422, f"alwayson_scripts.controlnet.args[{index}]: no image (give a ready-made control image)")
    return value


def controlnet_units(body: Any) -> list[tuple[Any, float, float, float, str]]:
    """(base64 image, weight, guidance start, guidance end, control map) of each enabled unit, in order."""
    scripts = getattr(body, "alwayson_scripts", None) or {}
    if not isinstance(scripts, dict):
        raise ApiError(422, "alwayson_scripts: expected an object")
    cn = scripts.get("controlnet") or scripts.get("ControlNet")
    if not cn:
        return []
    args = cn.get("args") if isinstance(cn, dict) else None
    if not isinstance(args, list) or len(args) > 8:
        raise ApiError(422, "alwayson_scripts.controlnet.args: expected a list of at most 8 units")
    units = []
    for i, unit in enumerate(args):
        if not isinstance(unit, dict):
            raise ApiError(422, f"alwayson_scripts.controlnet.args[{i}]: expected an object")
        if unit.get("enabled", True) is False:
            continue
        module = unit.get("module")
        if module in _NONE:
            made = "none"
        elif module == "canny":
            try:
                low, high = (float(unit.get(k, d)) for k, d in (("threshold_a", 100.0), ("threshold_b", 200.0)))
            except (TypeError, ValueError):
                raise ApiError(422, f"alwayson_scripts.controlnet.args[{i}]: threshold_a/threshold_b must be "
                                    "numbers") from None
            made = f"canny:{low!r},{high!r}"
        else:
            raise ApiError(422, f"alwayson_scripts.controlnet.args[{i}].module: {str(module)[:40]!r} is a "
                                "preprocessor enginekit does not run (it runs canny); send the control image it "
                                "makes (module none)")
        try:
            values = [float(unit.get(k, d)) for k, d in (("weight", 1.0), ("guidance_start", 0.0), ("guidance_end", 1.0))]
        except (TypeError, ValueError):
            raise ApiError(422, f"alwayson_scripts.controlnet.args[{i}]: weight and guidance_start/end must be "
                                "numbers") from None
        units.append((_image_field(unit, i), *values, made))
    return units
