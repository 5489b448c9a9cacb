"""What every scheduler shares: the config dataclass, the beta schedules, the step bookkeeping.

These are numpy ports of diffusers' schedulers, kept step-for-step identical to
the diffusers version they were read from (0.42), so that a pipeline calling
``step`` in order gets the same latents as diffusers does with the same model
outputs and noise. Each array and scalar has the dtype diffusers gives it and
each formula keeps diffusers' order of operations: float32 schedules (betas,
alphas cumprod, sigmas) and float32 step arithmetic, float64 where diffusers
computes in numpy float64 (timestep spacing, Karras sigmas, flow shifts).
Stepping in float64 instead would be more exact but drifts from diffusers: a
50-step DDIM run ends 2.4e-6 away, past the 1e-6 the parity tests allow.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from enginekit.errors import InputError, ShapeError

__all__ = [
    "Scheduler",
    "ConfigBase",
    "SchedulerConfig",
    "make_alphas_cumprod",
    "make_betas",
    "rescale_zero_terminal_snr",
    "spaced_timesteps",
    "karras_sigmas",
    "sigma_to_t",
    "dynamic_threshold",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def _one_of(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class ConfigBase:
    """A scheduler's settings: a frozen dataclass whose fields are diffusers' ``__init__``
    arguments of the ported class, so a ``scheduler_config.json`` maps onto it key for key."""

    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        n = self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise InputError(f"num_train_timesteps must be an integer of at least 2; got {n!r}")

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> ConfigBase:
        """Build from a diffusers config dict the way ``from_config`` does.

        Keys this scheduler knows are used and others ignored (a PNDM config's
        ``skip_prk_steps`` means nothing to Euler), so are keys diffusers lists
        in ``_use_default_values`` (they hold the *other* class's defaults); the
        dataclass defaults fill the rest. ``overrides`` win, and must be known.
        """
        if not isinstance(config, Mapping):
            raise InputError(f"a scheduler config must be a dict, got {type(config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InputError(f"unknown scheduler setting(s) {unknown}; this scheduler takes {sorted(known)}")
        defaulted = set(config.get("_use_default_values", ()))
        kwargs = {k: v for k, v in config.items() if k in known and k not in defaulted}
        kwargs.update(overrides)
        return cls(**kwargs)


@dataclass(frozen=True)
class SchedulerConfig(ConfigBase):
    """The settings every beta-schedule (DDPM-family) scheduler reads; subclasses add their own."""

    #: prediction types the scheduler's step understands (a subclass narrows it).
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise InputError(f"trained_betas has {len(self.trained_betas)} values; "
                                 f"num_train_timesteps is {self.num_train_timesteps}")
        else:
            _one_of("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _one_of("prediction_type", self.prediction_type, self.PREDICTION_TYPES)
        _one_of("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)


# -- beta schedules ---------------------------------------------------------------------------


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule (Nichol & Dhariwal); computed in Python floats as diffusers does."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def make_betas(config: SchedulerConfig) -> np.ndarray:
    """The float32 betas of ``config`` (trained, linear, scaled_linear or squaredcos_cap_v2)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32) ** 2
    else:
        betas = _betas_for_alpha_bar(n)
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def _cumprod(x: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in double and rounds each output;
    # a float32 running product drifts from it by ~1e-6 over 1000 steps.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale float32 betas to zero terminal SNR (Lin et al. 2023, Algorithm 1)."""
    root = np.sqrt(_cumprod(np.float32(1.0) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_bar = root**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """The float32 cumulative product of ``1 - betas``."""
    return _cumprod(np.float32(1.0) - betas)


# -- timestep and sigma helpers shared by several schedulers ---------------------------------


def spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int) -> np.ndarray:
    """The ``n`` descending float64 timesteps of a spacing (Lin et al. 2023, Table 2).

    ``linspace`` is left unrounded: Euler keeps the fractions, DDIM rounds them.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // n
        return (np.arange(0, n) * ratio).round()[::-1] + steps_offset
    ratio = num_train / n
    return np.arange(num_train, 0, -ratio).round() - 1


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels: ``n`` float64 sigmas from ``sigma_max`` down to ``sigma_min``."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigmas`` by interpolating in log-sigma."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10)).reshape(1, -1)
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma[0]) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


def dynamic_threshold(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Imagen's dynamic thresholding of a predicted clean sample, per batch item."""
    flat = x0.reshape(x0.shape[0], -1)
    s = np.clip(np.quantile(np.abs(flat), ratio, axis=1), 1, max_value)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x0.shape)


# -- the scheduler contract -------------------------------------------------------------------


class Scheduler(abc.ABC):
    """A diffusers-like sampler over numpy arrays.

    Call :meth:`set_timesteps`, multiply the initial noise by
    :attr:`init_noise_sigma`, then for each ``t`` in :attr:`timesteps`: feed the
    model ``scale_model_input(x, t)`` and replace ``x`` by ``step(out, t, x)``.
    Stochastic schedulers (:attr:`stochastic`) take that step's standard-normal
    ``noise`` from the caller, who draws it from a numpy Generator.
    """

    Config: ClassVar[type[ConfigBase]] = SchedulerConfig
    #: model evaluations per entry of :attr:`timesteps` (1 for every scheduler here).
    order: ClassVar[int] = 1
    #: diffusers keeps a step counter for this class (DDIM steps by timestep value alone).
    _tracks_step_index: ClassVar[bool] = True

    def __init__(self, config: ConfigBase | None = None) -> None:
        self.config: Any = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise InputError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(self.config).__name__}")
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray = np.zeros(0, dtype=np.float32)
        #: the clean-sample estimate of the last step (diffusers' ``pred_original_sample``,
        #: LCM's ``denoised``), for previews; None before the first step.
        self.denoised: np.ndarray | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> Scheduler:
        """Build from a diffusers ``scheduler_config.json`` dict, like diffusers' ``from_config``."""
        return cls(cls.Config.from_mapping(config, overrides))

    @property
    def stochastic(self) -> bool:
        """True when :meth:`step` needs a ``noise`` array (draw one per step)."""
        return False

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation to scale the initial Gaussian noise by."""
        return 1.0

    @property
    def step_index(self) -> int | None:
        """Index into :attr:`timesteps` of the next step; None until the first call."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The index the first step starts from, when a pipeline set one."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``timesteps[begin_index]`` (image-to-image skips the first steps)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) \
                or not 0 <= begin_index <= len(self.timesteps):
            raise InputError(f"begin_index must be an integer in [0, {len(self.timesteps)}]; got {begin_index!r}")
        self._begin_index = int(begin_index)

    def set_timesteps(self, num_inference_steps: int, mu: float | None = None) -> None:
        """Make the schedule of ``num_inference_steps`` steps; resets the step counter.

        ``mu`` is the resolution-dependent shift of flow-matching schedules
        (FLUX); the others take none.
        """
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.config.num_train_timesteps:
            raise InputError(
                f"num_inference_steps must be an integer in [1, {self.config.num_train_timesteps}]; got {n!r}"
            )
        if mu is not None and not self._takes_mu():
            raise InputError(f"mu applies to flow-match schedules with use_dynamic_shifting; {type(self).__name__} takes none")
        self.num_inference_steps = int(n)
        self._set_timesteps(int(n), mu)
        self._step_index = None
        self._begin_index = None
        self.denoised = None

    def _takes_mu(self) -> bool:
        return False

    @abc.abstractmethod
    def _set_timesteps(self, n: int, mu: float | None) -> None:
        """Fill :attr:`timesteps` (and ``sigmas``) for ``n`` steps."""

    # -- step bookkeeping, as diffusers keeps it ---------------------------------------------

    def index_for_timestep(self, timestep: Any, schedule_timesteps: np.ndarray | None = None) -> int:
        """Where ``timestep`` sits in the schedule; the second match if it occurs twice,
        so that starting mid-schedule (image-to-image) does not skip a sigma."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        hits = np.flatnonzero(schedule == timestep)
        if len(hits) == 0:
            raise InputError(f"timestep {timestep!r} is not in this schedule; pass one of scheduler.timesteps")
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _noise_indices(self, timesteps: np.ndarray) -> list[int]:
        # diffusers' add_noise: look each timestep up unless a begin index says where we are.
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * len(timesteps)

    # -- the public per-step API -------------------------------------------------------------

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """The model's input at ``timestep``: ``sample`` as float32 unless the scheduler scales it."""
        return np.asarray(sample, dtype=np.float32)

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
             noise: np.ndarray | None = None) -> np.ndarray:
        """Advance ``sample`` from ``timestep`` to the next one; returns the new float32 sample."""
        if self.num_inference_steps is None:
            raise InputError(f"{type(self).__name__}.set_timesteps must be called before step")
        model_output = self._as_array("model_output", model_output)
        sample = self._as_array("sample", sample)
        if model_output.shape != sample.shape:
            raise ShapeError(f"model_output has shape {model_output.shape}, sample has {sample.shape}; they must match")
        if noise is not None:
            noise = self._as_array("noise", noise)
            if noise.shape != sample.shape:
                raise ShapeError(f"noise has shape {noise.shape}, sample has {sample.shape}; they must match")
        if self._tracks_step_index:
            if self._step_index is None:
                self._init_step_index(timestep)
            if self._step_index >= len(self.timesteps):
                raise InputError(f"step called past the last of {len(self.timesteps)} timesteps; "
                                 "call set_timesteps to start a new run")
        prev = self._step(model_output, timestep, sample, noise)
        self.denoised = self.denoised.astype(np.float32)
        if self._tracks_step_index:
            self._step_index += 1
        return prev.astype(np.float32)

    @abc.abstractmethod
    def _step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        """One step on float32 arrays; sets :attr:`denoised`."""

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: Any) -> np.ndarray:
        """Noise a clean ``original`` to the level of ``timestep`` (a scalar, or one per batch item)."""
        original = self._as_array("original", original)
        noise = self._as_array("noise", noise)
        if noise.shape != original.shape:
            raise ShapeError(f"noise has shape {noise.shape}, original has {original.shape}; they must match")
        t = np.atleast_1d(np.asarray(timestep))
        if t.ndim != 1 or (len(t) != 1 and (original.ndim == 0 or len(t) != original.shape[0])):
            raise ShapeError(f"add_noise takes one timestep or one per batch item; got shape {np.shape(timestep)}")
        return self._add_noise(original, noise, t).astype(np.float32)

    @abc.abstractmethod
    def _add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """Forward diffusion on float32 arrays; ``timesteps`` is 1-D."""

    @staticmethod
    def _per_item(values: np.ndarray, ndim: int) -> np.ndarray:
        # One coefficient per batch item, broadcast over the remaining axes.
        values = np.asarray(values, dtype=np.float32)
        return values.reshape(-1, *([1] * (ndim - 1))) if ndim else values.reshape(())

    @staticmethod
    def _as_array(name: str, value: Any) -> np.ndarray:
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"{name} must be a float array, got dtype {array.dtype}")
        return array.astype(np.float32)  # a copy: schedulers keep some inputs across steps

    def _need_noise(self, noise: np.ndarray | None) -> np.ndarray:
        if noise is None:
            raise InputError(
                f"{type(self).__name__} is stochastic: pass step(..., noise=rng.standard_normal(sample.shape))"
            )
        return noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
