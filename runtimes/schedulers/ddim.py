"""DDIM (Song et al. 2021): a port of diffusers' ``DDIMScheduler``.

DDIM works on the variance-preserving latents directly (``x = sqrt(a) x0 +
sqrt(1 - a) eps``), so the model input is the sample itself and the initial
noise has unit variance. ``eta`` (0 by default, the deterministic sampler)
mixes in fresh noise, which the caller passes to :meth:`DDIMScheduler.step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from enginekit.errors import InputError

from .base import Scheduler, SchedulerConfig, dynamic_threshold, make_alphas_cumprod, make_betas, spaced_timesteps

__all__ = ["DDIMConfig", "DDIMScheduler", "alpha_noise"]


@dataclass(frozen=True)
class DDIMConfig(SchedulerConfig):
    """diffusers' ``DDIMScheduler`` settings, plus the two it takes at ``step`` time."""

    clip_sample: bool = True
    set_alpha_to_one: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    #: The share of the DDPM posterior's noise to add back each step (diffusers' step(eta=)).
    eta: float = 0.0
    #: Re-derive epsilon from the clipped x0 (diffusers' step(use_clipped_model_output=)).
    use_clipped_model_output: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eta >= 0:
            raise InputError(f"eta must be at least 0; got {self.eta!r}")


def alpha_noise(alphas_cumprod: np.ndarray, original: np.ndarray, noise: np.ndarray,
                timesteps: np.ndarray) -> np.ndarray:
    """``sqrt(a_t) * original + sqrt(1 - a_t) * noise``: diffusers' DDPM-family add_noise."""
    if np.any(timesteps < 0) or np.any(timesteps >= len(alphas_cumprod)):
        raise InputError(f"add_noise timesteps must lie in [0, {len(alphas_cumprod)}); got {timesteps.tolist()}")
    alpha = alphas_cumprod[np.asarray(timesteps, dtype=np.int64)]
    shape = (-1, *([1] * (original.ndim - 1))) if original.ndim else ()
    return (alpha**0.5).reshape(shape) * original + ((1 - alpha) ** 0.5).reshape(shape) * noise


class DDIMScheduler(Scheduler):
    """Denoising diffusion implicit models; steps by timestep value, keeping no step counter."""

    Config = DDIMConfig
    _tracks_step_index = False

    def __init__(self, config: DDIMConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.betas = make_betas(cfg)
        self.alphas_cumprod = make_alphas_cumprod(self.betas)
        # The alpha "before" t=0: 1 (fully clean) or the first step's, as the model family wants.
        self.final_alpha_cumprod = np.float32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = np.arange(cfg.num_train_timesteps)[::-1].astype(np.int64)

    @property
    def stochastic(self) -> bool:
        return self.config.eta > 0

    def _set_timesteps(self, n: int, mu: float | None) -> None:
        cfg = self.config
        timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        self.timesteps = timesteps.round().astype(np.int64)

    def _alpha(self, t: int) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        cfg = self.config
        t = int(timestep)
        if not 0 <= t < cfg.num_train_timesteps:
            raise InputError(f"timestep {timestep!r} is outside [0, {cfg.num_train_timesteps})")
        # diffusers steps back by the mean spacing, not to the next entry of timesteps.
        prev_t = t - cfg.num_train_timesteps // self.num_inference_steps
        alpha_t, alpha_prev = self._alpha(t), self._alpha(prev_t)
        beta_t = 1 - alpha_t
        if cfg.prediction_type == "epsilon":
            x0 = (sample - beta_t**0.5 * model_output) / alpha_t**0.5
            eps = model_output
        elif cfg.prediction_type == "sample":
            x0 = model_output
            eps = (sample - alpha_t**0.5 * x0) / beta_t**0.5
        else:
            x0 = (alpha_t**0.5) * sample - (beta_t**0.5) * model_output
            eps = (alpha_t**0.5) * model_output + (beta_t**0.5) * sample
        if cfg.thresholding:
            x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        elif cfg.clip_sample:
            x0 = np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        self.denoised = x0
        # Eq. 16: the DDPM posterior variance, scaled by eta.
        variance = ((1 - alpha_prev) / beta_t) * (1 - alpha_t / alpha_prev)
        std = cfg.eta * variance**0.5
        if cfg.use_clipped_model_output:
            eps = (sample - alpha_t**0.5 * x0) / beta_t**0.5
        prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
        if cfg.eta > 0:
            prev = prev + std * self._need_noise(noise)
        return prev

    def _add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        return alpha_noise(self.alphas_cumprod, original, noise, timesteps)
