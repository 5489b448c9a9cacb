"""Flow-matching Euler (SD3, FLUX): a port of diffusers' ``FlowMatchEulerDiscreteScheduler``.

Rectified-flow models predict the velocity ``noise - x0`` along the straight
line ``x_sigma = (1 - sigma) x0 + sigma noise``, so a step is one Euler move
``x += (sigma_next - sigma) * v``. The schedule is shifted towards high noise,
by a fixed ``shift`` (SD3: 3.0) or by ``exp(mu)`` from the image size (FLUX).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from enginekit.errors import InputError

from .base import ConfigBase, Scheduler, _one_of, karras_sigmas

__all__ = ["FlowMatchConfig", "FlowMatchEulerScheduler"]


@dataclass(frozen=True)
class FlowMatchConfig(ConfigBase):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` settings (``use_beta_sigmas`` is not ported)."""

    shift: float = 1.0
    use_dynamic_shifting: bool = False
    #: mu at base_image_seq_len and max_image_seq_len latent tokens (see :meth:`FlowMatchEulerScheduler.mu_for`).
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    invert_sigmas: bool = False
    shift_terminal: float | None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    time_shift_type: str = "exponential"
    stochastic_sampling: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("time_shift_type", self.time_shift_type, ("exponential", "linear"))
        if not self.shift > 0:
            raise InputError(f"shift must be positive; got {self.shift!r}")
        if self.use_beta_sigmas:
            raise InputError("use_beta_sigmas is not supported by the numpy flow-match Euler (it needs scipy)")
        if self.use_karras_sigmas and self.use_exponential_sigmas:
            raise InputError("use_karras_sigmas and use_exponential_sigmas cannot both be set")


class FlowMatchEulerScheduler(Scheduler):
    """Euler steps along a rectified flow; the model input is the sample as is."""

    Config = FlowMatchConfig

    def __init__(self, config: FlowMatchConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        n = cfg.num_train_timesteps
        # float32 throughout, as diffusers builds it: sigma_min and sigma_max bound every schedule.
        sigmas = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
        if not cfg.use_dynamic_shifting:
            sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
        self.sigmas = sigmas.astype(np.float32)
        self.timesteps = self.sigmas * np.float32(n)
        self.sigma_min = float(self.sigmas[-1])
        self.sigma_max = float(self.sigmas[0])
        self._custom_sigmas: np.ndarray | None = None

    @property
    def stochastic(self) -> bool:
        return self.config.stochastic_sampling

    def mu_for(self, image_seq_len: int) -> float:
        """FLUX's ``mu`` for ``image_seq_len`` latent tokens: linear between the config's
        (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
        cfg = self.config
        m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
        return image_seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)

    def set_timesteps(self, num_inference_steps: int, mu: float | None = None, *,
                      sigmas: Sequence[float] | None = None) -> None:
        """Make the schedule; ``mu`` is required with ``use_dynamic_shifting``.

        ``sigmas`` replaces the default linear ramp before shifting (FLUX's
        pipeline passes ``np.linspace(1, 1 / n, n)``); it must have ``n`` values.
        """
        if sigmas is not None and len(sigmas) != num_inference_steps:
            raise InputError(f"sigmas has {len(sigmas)} values; num_inference_steps is {num_inference_steps}")
        self._custom_sigmas = None if sigmas is None else np.asarray(sigmas).astype(np.float32)
        super().set_timesteps(num_inference_steps, mu)

    def _takes_mu(self) -> bool:
        return self.config.use_dynamic_shifting

    def _set_timesteps(self, n: int, mu: float | None) -> None:
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise InputError("mu must be passed to set_timesteps when use_dynamic_shifting is set (see mu_for)")
        if self._custom_sigmas is None:
            timesteps = np.linspace(self.sigma_max * cfg.num_train_timesteps,
                                    self.sigma_min * cfg.num_train_timesteps, n)
            sigmas = timesteps / cfg.num_train_timesteps
        else:
            sigmas = self._custom_sigmas
        if cfg.use_dynamic_shifting:
            sigmas = self._time_shift(mu, sigmas)
        else:
            sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
        if cfg.shift_terminal:
            # Stretch so the last sigma lands on shift_terminal instead of near 0.
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
        if cfg.use_karras_sigmas:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
        elif cfg.use_exponential_sigmas:
            sigmas = np.exp(np.linspace(math.log(float(sigmas[0])), math.log(float(sigmas[-1])), n))
        sigmas = np.asarray(sigmas).astype(np.float32)
        end = np.float32(0.0)
        if cfg.invert_sigmas:
            sigmas, end = np.float32(1.0) - sigmas, np.float32(1.0)
        self.timesteps = (sigmas * np.float32(cfg.num_train_timesteps)).astype(np.float32)
        self.sigmas = np.concatenate([sigmas, [end]]).astype(np.float32)

    def _time_shift(self, mu: float, t: np.ndarray) -> np.ndarray:
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
        return mu / (mu + (1 / t - 1) ** 1.0)

    def _step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        self.denoised = x0 = sample - sigma * model_output
        if not self.config.stochastic_sampling:
            return sample + (sigma_next - sigma) * model_output
        # Stochastic sampling re-noises the clean estimate to the next level with fresh noise.
        if sigma_next == 0:
            return x0
        return (1.0 - sigma_next) * x0 + sigma_next * self._need_noise(noise)

    def _add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """diffusers' ``scale_noise``: the point at sigma on the line from ``original`` to ``noise``."""
        sigma = self._per_item(self.sigmas[self._noise_indices(timesteps)], original.ndim)
        return sigma * noise + (1.0 - sigma) * original
