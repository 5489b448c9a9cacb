"""Euler and Euler-ancestral samplers in sigma space (Karras et al. 2022, Algorithm 2).

Ports of diffusers' ``EulerDiscreteScheduler`` and ``EulerAncestralDiscreteScheduler``.
The latents live at noise level sigma (``x = x0 + sigma * eps``), so the model
input is divided by ``sqrt(sigma**2 + 1)`` to bring it back to unit variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from enginekit.errors import InputError

from .base import (
    Scheduler,
    SchedulerConfig,
    _one_of,
    karras_sigmas,
    make_alphas_cumprod,
    make_betas,
    sigma_to_t,
    spaced_timesteps,
)

__all__ = ["EulerConfig", "EulerScheduler", "EulerAncestralConfig", "EulerAncestralScheduler"]


class _SigmaScheduler(Scheduler):
    """What the two Euler samplers share: training sigmas, input scaling, add_noise."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.betas = make_betas(cfg)
        self.alphas_cumprod = make_alphas_cumprod(self.betas)
        if cfg.rescale_betas_zero_snr:
            # Zero terminal SNR means an infinite last sigma; diffusers caps it at 2**-24.
            self.alphas_cumprod[-1] = 2.0**-24
        #: sigma of every training timestep, ascending with t (float32).
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        n = cfg.num_train_timesteps
        # Until set_timesteps, the schedule is every training step, as in diffusers.
        self.timesteps = np.linspace(0, n - 1, n)[::-1].astype(np.float32)
        #: the noise level of each timestep, then the final one (float32, one longer than timesteps).
        self.sigmas = np.concatenate([self.train_sigmas[::-1], [0.0]]).astype(np.float32)

    @property
    def init_noise_sigma(self) -> float:
        top = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(top)
        # 'leading' never reaches the top training sigma, so the variance adds the unit signal.
        return float((top**2 + 1) ** 0.5)

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """``sample / sqrt(sigma**2 + 1)`` at ``timestep`` (fixes the step index on first use)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return np.asarray(sample, dtype=np.float32) / ((sigma**2 + 1) ** 0.5)

    def _add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        sigma = self._per_item(self.sigmas[self._noise_indices(timesteps)], original.ndim)
        return original + noise * sigma

    def _pred_original(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        kind = self.config.prediction_type
        if kind == "epsilon":
            return sample - sigma * model_output
        if kind == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        return model_output


@dataclass(frozen=True)
class EulerConfig(SchedulerConfig):
    """diffusers' ``EulerDiscreteScheduler`` settings (``use_beta_sigmas`` is not ported)."""

    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample", "original_sample")

    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("interpolation_type", self.interpolation_type, ("linear", "log_linear"))
        _one_of("timestep_type", self.timestep_type, ("discrete", "continuous"))
        _one_of("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        if self.use_beta_sigmas:
            raise InputError("use_beta_sigmas is not supported by the numpy Euler (it needs scipy); use "
                             "use_karras_sigmas or use_exponential_sigmas")
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise InputError("use_karras_sigmas and use_exponential_sigmas cannot both be set")


class EulerScheduler(_SigmaScheduler):
    """Euler's method on the probability-flow ODE (diffusers' ``EulerDiscreteScheduler``, no churn)."""

    Config = EulerConfig

    def __init__(self, config: EulerConfig | None = None) -> None:
        super().__init__(config)
        if self._continuous:
            self.timesteps = self._continuous_timesteps(self.sigmas[:-1])

    @property
    def _continuous(self) -> bool:
        # EDM-style v-prediction models (CosXL) take 0.25*log(sigma) as their timestep.
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @staticmethod
    def _continuous_timesteps(sigmas: np.ndarray) -> np.ndarray:
        return (np.float32(0.25) * np.log(sigmas.astype(np.float32))).astype(np.float32)

    def _set_timesteps(self, n: int, mu: float | None) -> None:
        cfg = self.config
        train = self.train_sigmas
        log_sigmas = np.log(train)
        timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        timesteps = timesteps.astype(np.float32)
        if cfg.interpolation_type == "linear":
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        else:
            # diffusers' log_linear yields n + 1 sigmas before the final one is appended; kept as is.
            sigmas = np.exp(np.linspace(np.log(train[-1]), np.log(train[0]), n + 1).astype(np.float32))
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
            lo = cfg.sigma_min if cfg.sigma_min is not None else float(sigmas[-1])
            hi = cfg.sigma_max if cfg.sigma_max is not None else float(sigmas[0])
            if cfg.use_karras_sigmas:
                sigmas = karras_sigmas(lo, hi, n)
            else:
                sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), n))
            timesteps = sigma_to_t(sigmas, log_sigmas)
        if cfg.final_sigmas_type == "sigma_min":
            last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            last = 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        if self._continuous:
            self.timesteps = self._continuous_timesteps(self.sigmas[:-1])
        else:
            self.timesteps = np.asarray(timesteps).astype(np.float32)

    def _step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        self.denoised = x0 = self._pred_original(model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        return sample + derivative * (sigma_next - sigma)


@dataclass(frozen=True)
class EulerAncestralConfig(SchedulerConfig):
    """diffusers' ``EulerAncestralDiscreteScheduler`` settings."""

    # diffusers raises NotImplementedError for 'sample'.
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")


class EulerAncestralScheduler(_SigmaScheduler):
    """Euler with fresh noise each step (diffusers' ``EulerAncestralDiscreteScheduler``).

    Each step goes down to ``sigma_down`` deterministically, then adds
    ``sigma_up * noise`` so that the total variance lands on the next sigma.
    """

    Config = EulerAncestralConfig

    @property
    def stochastic(self) -> bool:
        return True

    def _set_timesteps(self, n: int, mu: float | None) -> None:
        cfg = self.config
        timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        self.timesteps = timesteps.astype(np.float32)
        sigmas = np.interp(self.timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)

    def _step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        self.denoised = x0 = self._pred_original(model_output, sample, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (sigma_down - sigma)
        if sigma_up > 0:  # the last step lands on sigma 0 and needs no noise
            prev = prev + self._need_noise(noise) * sigma_up
        return prev
