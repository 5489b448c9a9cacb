"""Latent consistency models (Luo et al. 2023): a port of diffusers' ``LCMScheduler``.

Each step maps the sample straight to a clean estimate (:attr:`denoised`) with
the consistency boundary condition, then re-noises it to the next timestep with
fresh noise from the caller; the last step returns the estimate itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from enginekit.errors import InputError

from .base import Scheduler, SchedulerConfig, dynamic_threshold, make_alphas_cumprod, make_betas
from .ddim import alpha_noise

__all__ = ["LCMConfig", "LCMScheduler"]


@dataclass(frozen=True)
class LCMConfig(SchedulerConfig):
    """diffusers' ``LCMScheduler`` settings (its defaults are SD 1.5's schedule)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    #: the teacher schedule's length the model was distilled on; inference picks a subset.
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    # Read by diffusers' config but not by its LCM set_timesteps; kept for from_config.
    timestep_spacing: str = "leading"
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.original_inference_steps <= self.num_train_timesteps:
            raise InputError(
                f"original_inference_steps must be in [1, {self.num_train_timesteps}]; got {self.original_inference_steps!r}"
            )


class LCMScheduler(Scheduler):
    """Multistep consistency sampling; :attr:`denoised` is the estimate diffusers' pipeline decodes."""

    Config = LCMConfig

    def __init__(self, config: LCMConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.betas = make_betas(cfg)
        self.alphas_cumprod = make_alphas_cumprod(self.betas)
        self.final_alpha_cumprod = np.float32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = np.arange(cfg.num_train_timesteps)[::-1].astype(np.int64)
        self._original_steps: int | None = None
        self._strength = 1.0

    @property
    def stochastic(self) -> bool:
        return True

    def set_timesteps(self, num_inference_steps: int, mu: float | None = None, *,
                      original_inference_steps: int | None = None, strength: float = 1.0) -> None:
        """Pick ``num_inference_steps`` of the teacher's ``original_inference_steps`` timesteps.

        ``strength`` < 1 (image-to-image) keeps only that share of the teacher
        schedule, as diffusers' LCM img2img pipeline asks for.
        """
        if original_inference_steps is not None and not 1 <= original_inference_steps <= self.config.num_train_timesteps:
            raise InputError(f"original_inference_steps must be in [1, {self.config.num_train_timesteps}]; "
                             f"got {original_inference_steps!r}")
        if not 0 < strength <= 1:
            raise InputError(f"strength must be in (0, 1]; got {strength!r}")
        self._original_steps, self._strength = original_inference_steps, float(strength)
        super().set_timesteps(num_inference_steps, mu)

    def _set_timesteps(self, n: int, mu: float | None) -> None:
        cfg = self.config
        original = self._original_steps if self._original_steps is not None else cfg.original_inference_steps
        k = cfg.num_train_timesteps // original
        teacher = np.arange(1, int(original * self._strength) + 1) * k - 1
        if len(teacher) // n < 1:
            raise InputError(
                f"num_inference_steps ({n}) must be at most original_inference_steps x strength "
                f"({original} x {self._strength:g} = {len(teacher)})"
            )
        if n > original:
            raise InputError(f"num_inference_steps ({n}) must be at most original_inference_steps ({original})")
        teacher = teacher[::-1].copy()
        picks = np.floor(np.linspace(0, len(teacher), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = teacher[picks].astype(np.int64)

    def _boundary_scalings(self, t: int) -> tuple[np.float32, np.float32]:
        # c_skip -> 1 and c_out -> 0 as t -> 0, so the consistency function is the identity there.
        sigma_data = 0.5
        scaled = np.float32(t * self.config.timestep_scaling)
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
        return c_skip, c_out

    def _step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        cfg = self.config
        t = int(timestep)
        i = self._step_index
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
        c_skip, c_out = self._boundary_scalings(t)
        if cfg.prediction_type == "epsilon":
            x0 = (sample - np.sqrt(beta_t) * model_output) / np.sqrt(alpha_t)
        elif cfg.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = np.sqrt(alpha_t) * sample - np.sqrt(beta_t) * model_output
        if cfg.thresholding:
            x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        elif cfg.clip_sample:
            x0 = np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        self.denoised = denoised = c_out * x0 + c_skip * sample
        if i == self.num_inference_steps - 1:
            return denoised
        return np.sqrt(alpha_prev) * denoised + np.sqrt(beta_prev) * self._need_noise(noise)

    def _add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        return alpha_noise(self.alphas_cumprod, original, noise, timesteps)
