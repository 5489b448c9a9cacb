"""A runner under the names a task uses, over an engine another tool wrote.

``enginekit import`` takes folders that optimum-cli (OpenVINO) and optimum's ONNX export write,
without rewriting their engines. Their interfaces differ from enginekit's own in small, known
ways: a CLIP text encoder gives ``pooler_output`` or ``text_embeds`` where enginekit's pipeline
reads ``pooled``, and ``hidden_states.N`` where it reads ``penultimate_hidden_state``; an MMDiT
takes ``hidden_states`` where a UNet takes ``sample``; optimum's UNet takes one ``timestep`` for
the whole batch. The manifest records that per component (:attr:`Component.interface`) and
:func:`with_interface` puts an :class:`InterfaceRunner` in front of the engine's runner, so the
task objects, which name no tool, run the vendor's files as they are.

Core: imports no stage.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from enginekit.engine import Runner
from enginekit.errors import ShapeError
from enginekit.manifest import Component, Manifest, TensorSpec

__all__ = ["InterfaceRunner", "with_interface", "carry_interfaces"]


class InterfaceRunner(Runner):
    """``inner`` with its inputs and outputs renamed to the task's names (``interface``: see
    :attr:`Component.interface`). A ``one_row`` input is declared with a free first axis and fed
    to the engine as its first row, after checking every row holds the same values (a batch
    that asks different values of it is an error, not a silent choice)."""

    def __init__(self, inner: Runner, interface: Mapping[str, Any]) -> None:
        inputs = dict(interface.get("inputs") or {})
        outputs = dict(interface.get("outputs") or {})
        self._one_row = frozenset(interface.get("one_row") or ())
        self._to_engine = {task: engine for task, engine in inputs.items()}
        self._from_engine = {engine: task for task, engine in outputs.items()}
        task_in = {engine: task for task, engine in inputs.items()}
        specs = []
        for spec in inner.inputs:
            name = task_in.get(spec.name, spec.name)
            shape = ("batch", *spec.shape[1:]) if name in self._one_row and spec.shape else spec.shape
            specs.append(TensorSpec(name, spec.dtype, tuple(shape)))
        super().__init__(specs, [TensorSpec(self._from_engine.get(s.name, s.name), s.dtype, s.shape)
                                 for s in inner.outputs])
        self.inner = inner
        self.backend = inner.backend
        self.device = inner.device
        self.component = inner.component

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        engine_feeds = {}
        for name, value in feeds.items():
            if name in self._one_row and value.ndim and len(value) > 1:
                if not np.array_equal(value, np.broadcast_to(value[:1], value.shape)):
                    raise ShapeError(f"{self._label()} takes one {name!r} for the whole batch; the rows differ")
                value = np.ascontiguousarray(value[:1])
            engine_feeds[self._to_engine.get(name, name)] = value
        out = self.inner.run(engine_feeds)
        return {self._from_engine.get(name, name): value for name, value in out.items()}

    def _interrupt(self) -> bool:
        return self.inner.interrupt()

    def _close(self) -> None:
        self.inner.close()

    @property
    def broken(self) -> str | None:  # type: ignore[override]
        return self.inner.broken

    @broken.setter
    def broken(self, value: str | None) -> None:
        pass  # the inner runner keeps its own state (its run() recovers or marks itself broken)

    def __getattr__(self, name: str) -> Any:
        # What a backend's runner adds (``cache_dir``, ``loaded_from_cache``): the inner runner's.
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def with_interface(runner: Runner, component: Component) -> Runner:
    """``runner`` as the task names its tensors: an :class:`InterfaceRunner` where the component
    records an interface, else the runner itself."""
    return InterfaceRunner(runner, component.interface) if component.interface else runner


def carry_interfaces(parent: Manifest, child: Manifest) -> Manifest:
    """``child`` (a backend's compile of ``parent``, its engines keeping their tensor names) with
    each component's interface carried over from the parent where the child records none."""
    components = {name: comp.replace(interface=parent.components[name].interface)
                  if name in parent.components and parent.components[name].interface and not comp.interface else comp
                  for name, comp in child.components.items()}
    return child.replace(components=components)
