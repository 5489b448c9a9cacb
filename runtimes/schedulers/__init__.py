"""Numpy ports of diffusers' schedulers, for text-to-image without torch.

Build one by name from the ``scheduler/scheduler_config.json`` a diffusers
pipeline ships, the way ``EulerDiscreteScheduler.from_config(pipe.scheduler.config)``
does::

    sched = make_scheduler("dpm++2m-karras", json.load(open("scheduler/scheduler_config.json")))
    sched.set_timesteps(25)
    x = rng.standard_normal(shape) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, noise=rng.standard_normal(shape) if sched.stochastic else None)

Each port matches the diffusers class in its name step for step (see
``tests/runtimes/test_schedulers.py``); nothing here imports torch or diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from enginekit.errors import InputError

from .base import ConfigBase, Scheduler, SchedulerConfig
from .ddim import DDIMConfig, DDIMScheduler
from .dpm import DPMSolverConfig, DPMSolverMultistepScheduler
from .euler import EulerAncestralConfig, EulerAncestralScheduler, EulerConfig, EulerScheduler
from .flow import FlowMatchConfig, FlowMatchEulerScheduler
from .lcm import LCMConfig, LCMScheduler

__all__ = [
    "SCHEDULERS",
    "make_scheduler",
    "Scheduler",
    "ConfigBase",
    "SchedulerConfig",
    "EulerScheduler",
    "EulerConfig",
    "EulerAncestralScheduler",
    "EulerAncestralConfig",
    "DDIMScheduler",
    "DDIMConfig",
    "DPMSolverMultistepScheduler",
    "DPMSolverConfig",
    "LCMScheduler",
    "LCMConfig",
    "FlowMatchEulerScheduler",
    "FlowMatchConfig",
]

# name -> (class, settings the name itself fixes over the config file's).
_REGISTRY: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "euler": (EulerScheduler, {}),
    "euler-a": (EulerAncestralScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler,
                {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler,
                       {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
    "flow-euler": (FlowMatchEulerScheduler, {}),
}

#: The scheduler names :func:`make_scheduler` takes.
SCHEDULERS: tuple[str, ...] = tuple(_REGISTRY)


def make_scheduler(name: str, config: Mapping[str, Any], **overrides: Any) -> Scheduler:
    """The scheduler ``name`` built from a diffusers scheduler config dict.

    Keys the scheduler knows are read from ``config`` and the rest ignored, as
    diffusers' ``from_config`` does; ``overrides`` (e.g. ``eta=0.5`` for DDIM,
    ``prediction_type="v_prediction"``) win over both the file and the name.
    """
    try:
        cls, pinned = _REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}") from None
    return cls.from_config(config, **{**pinned, **overrides})
