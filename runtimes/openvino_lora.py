"""OpenVINO's part of LoRA at run time: an IR compiled again with some Constants replaced.

A weight NNCF compressed (int8/int4: an integer Constant, then Convert, Subtract of the zero
point, Multiply by the scale, a Reshape for groups, a Convert to float) is patched where the chain
ends: the float weight it decompresses to plus the LoRA update becomes a float Constant there, so
the LoRA layers of a quantized engine run in float and the rest stays compressed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from enginekit.errors import BackendError, one_line
from enginekit.manifest import Manifest
from enginekit.runtimes.openvino_cache import low_memory_config
from enginekit.runtimes.openvino_shapes import specs

__all__ = ["load_patched", "decompression_end", "decompressed"]

#: The ops NNCF's weight decompression is made of, from the compressed Constant to the float weight.
_CHAIN = ("Convert", "Subtract", "Multiply", "Reshape")


def decompression_end(const: Any) -> Any | None:
    """The op whose output is the float weight the integer Constant ``const`` decompresses to
    (None: not a compressed weight, or one shared by several layers)."""
    if not const.get_output_element_type(0).is_integral():
        return None
    node = const
    while True:
        users = list(node.output(0).get_target_inputs())
        if len(users) != 1 or users[0].get_node().get_type_name() not in _CHAIN:
            break
        nxt, came = users[0].get_node(), users[0].get_index()
        # the zero point, the scale and the shape are constants; anything else is not a weight's chain
        if not all(_constant(nxt.input_value(i)) for i in range(nxt.get_input_size()) if i != came):
            break
        node = nxt
    if node is const or not node.get_output_element_type(0).is_real() or not node.get_output_partial_shape(0).is_static:
        return None
    return node


def _constant(value: Any) -> bool:
    node = value.get_node()
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def decompressed(ends: Mapping[str, Any], chunk_bytes: int = 512 << 20) -> Iterator[tuple[str, Any]]:
    """The float weights the decompression chains ending at ``ends`` (name -> op) compute, as
    float32 arrays: the chains evaluated by OpenVINO itself, in constant-only models of at most
    ``chunk_bytes`` of output each, yielded as they come (a full-size UNet's weights in float32
    would not all fit beside the rest)."""
    import openvino as ov

    core, batch, size = ov.Core(), [], 0
    names = list(ends)
    for i, name in enumerate(names):
        batch.append(name)
        size += 4 * int(np.prod(ends[name].get_output_shape(0)))
        if size < chunk_bytes and i + 1 < len(names):
            continue
        sub = ov.Model([ends[n].output(0) for n in batch], [], "decompressed_weights")
        result = core.compile_model(sub, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({})
        for k, n in enumerate(batch):
            yield n, result[k].astype(np.float32, copy=False)
        del result, sub
        batch, size = [], 0


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
            # a compressed weight: replaced where its decompression ends, by the float weight
            old = decompression_end(old) or old if old is not None else None
            if old is None or tuple(old.get_output_shape(0)) != tuple(value.shape):
                raise BackendError(f"{xml}: no constant {name!r} of shape {tuple(value.shape)} to patch; "
                                   "the weight map does not fit this engine (compile it again)")
            new = ov.op.Constant(value.astype(old.get_output_element_type(0).to_dtype(), copy=False))
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
