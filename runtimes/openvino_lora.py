"""OpenVINO's part of LoRA at run time: an IR compiled again with some Constants replaced."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from enginekit.errors import BackendError, one_line
from enginekit.manifest import Manifest
from enginekit.runtimes.openvino_cache import low_memory_config
from enginekit.runtimes.openvino_shapes import specs

__all__ = ["load_patched"]


def load_patched(backend: Any, artifact: Path, manifest: Manifest, device: str, component: str,
                 tensors: Mapping[str, Any], low_memory: bool = False) -> Any:
    """Read ``component``'s IR, replace the Constants named in ``tensors`` (friendly name -> value of
    the same shape and element type) and compile it; never through the model cache, whose key would
    have to hash the new weights (and whose blobs would pile up, one per LoRA combination)."""
    import openvino as ov

    from enginekit.runtimes.openvino import OpenVINORunner

    comp = manifest.component(component)
    if not comp.entry.endswith(".xml"):
        raise BackendError(f"LoRA at run time on OpenVINO needs an OpenVINO artifact; compile this one first: "
                           f"enginekit compile {artifact} --backend openvino -o OUT")
    xml = artifact / comp.entry
    ov_device = backend._device(device)
    config = backend._config(manifest, None, comp.name)
    if low_memory:
        config.update(low_memory_config())
    core = backend._core()

    def compile_it() -> Any:
        model = core.read_model(str(xml))
        constants = {op.get_friendly_name(): op for op in model.get_ops()
                     if op.get_type_name() == "Constant" and op.get_friendly_name() in tensors}
        for name, value in tensors.items():
            old = constants.get(name)
            if old is None or tuple(old.get_output_shape(0)) != tuple(value.shape):
                raise BackendError(f"{xml}: no constant {name!r} of shape {tuple(value.shape)} to patch; "
                                   "the weight map does not fit this engine (compile it again)")
            new = ov.op.Constant(value)
            new.set_friendly_name(name)
            old.output(0).replace(new.output(0))
        return core.compile_model(model, ov_device, config)

    try:
        compiled = compile_it()
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"openvino could not compile {xml} with LoRA weights: {one_line(exc)}") from exc
    runner = OpenVINORunner(compiled, specs(compiled.inputs, [*comp.inputs, *comp.outputs]),
                            specs(compiled.outputs, comp.outputs), device, None, False, rebuild=compile_it)
    runner.component = comp.name
    return runner
