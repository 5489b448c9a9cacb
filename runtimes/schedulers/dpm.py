"""DPM-Solver++ multistep (Lu et al. 2022): a port of diffusers' ``DPMSolverMultistepScheduler``.

Only ``algorithm_type="dpmsolver++"`` (the data-prediction solver every
text-to-image preset uses) is ported; the SDE and noise-prediction variants
raise. The solver converts each model output to a clean-sample estimate and
extrapolates from the last ``solver_order`` of them in log-SNR time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from enginekit.errors import InputError

from .base import Scheduler, SchedulerConfig, _one_of, dynamic_threshold, karras_sigmas, make_alphas_cumprod, \
    make_betas, sigma_to_t

__all__ = ["DPMSolverConfig", "DPMSolverMultistepScheduler"]


@dataclass(frozen=True)
class DPMSolverConfig(SchedulerConfig):
    """diffusers' ``DPMSolverMultistepScheduler`` settings that the numpy port honours.

    The other diffusers options keep their defaults here and raise when a
    config turns them on (exponential, beta, Lu or flow sigmas, learned variance).
    """

    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    #: fall back to lower orders on the last steps of short schedules (< 15 steps), for stability.
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: str | None = None
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("algorithm_type", self.algorithm_type, ("dpmsolver++",))
        _one_of("solver_type", self.solver_type, ("midpoint", "heun"))
        _one_of("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        if self.solver_order not in (1, 2, 3):
            raise InputError(f"solver_order must be 1, 2 or 3; got {self.solver_order!r}")
        for flag in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                     "use_dynamic_shifting"):
            if getattr(self, flag):
                raise InputError(f"{flag} is not supported by the numpy DPM-Solver++; only use_karras_sigmas is")
        if self.variance_type is not None:
            raise InputError(f"variance_type {self.variance_type!r} (learned variance) is not supported")


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    # sigma here is the Karras sigma; the VP alpha_t and sigma_t follow from it.
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
    # log-SNR; +inf at the final sigma of 0, where every update collapses to the last estimate.
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


class DPMSolverMultistepScheduler(Scheduler):
    """Multistep DPM-Solver++ of order 1-3 (``dpm++2m``: order 2, midpoint)."""

    Config = DPMSolverConfig

    def __init__(self, config: DPMSolverConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.betas = make_betas(cfg)
        self.alphas_cumprod = make_alphas_cumprod(self.betas)
        if cfg.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2.0**-24  # as Euler: cap the infinite terminal sigma
        self.lambda_t = np.log(np.sqrt(self.alphas_cumprod)) - np.log(np.sqrt(1 - self.alphas_cumprod))
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.sigmas = self.train_sigmas.copy()
        n = cfg.num_train_timesteps
        self.timesteps = np.linspace(0, n - 1, n)[::-1].astype(np.float32)
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[np.ndarray | None] = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def _set_timesteps(self, n: int, mu: float | None) -> None:
        cfg = self.config
        # lambda_min_clipped trims the noisiest end of the schedule (cosine schedules blow up there).
        clipped = int(np.searchsorted(self.lambda_t[::-1], cfg.lambda_min_clipped))
        last = cfg.num_train_timesteps - clipped
        # n + 1 points with the last dropped: the solver never evaluates the model at t=0.
        if cfg.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif cfg.timestep_spacing == "leading":
            ratio = last // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + cfg.steps_offset
        else:
            timesteps = np.arange(last, 0, -cfg.num_train_timesteps / n).round() - 1
        timesteps = timesteps.astype(np.int64)
        train = self.train_sigmas
        if cfg.use_karras_sigmas:
            sigmas = karras_sigmas(float(train[0]), float(train[-1]), n)
            timesteps = sigma_to_t(sigmas, np.log(train))
            if cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        last_sigma = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5 \
            if cfg.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self._reset_history()

    def index_for_timestep(self, timestep: Any, schedule_timesteps: np.ndarray | None = None) -> int:
        """As the base class, except that an unknown timestep means the last step (diffusers)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        hits = np.flatnonzero(schedule == timestep)
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _to_x0(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        cfg = self.config
        alpha, sigma = _alpha_sigma(self.sigmas[self._step_index])
        if cfg.prediction_type == "epsilon":
            x0 = (sample - sigma * model_output) / alpha
        elif cfg.prediction_type == "v_prediction":
            x0 = alpha * sample - sigma * model_output
        else:
            x0 = model_output
        if cfg.thresholding:
            x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        return x0

    def _step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        cfg = self.config
        i, count = self._step_index, len(self.timesteps)
        short = cfg.lower_order_final and count < 15
        final_first = i == count - 1 and (cfg.euler_at_final or short or cfg.final_sigmas_type == "zero")
        final_second = i == count - 2 and short
        self.denoised = x0 = self._to_x0(model_output, sample)
        self.model_outputs = [*self.model_outputs[1:], x0]
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or final_first:
            order = 1
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or final_second:
            order = 2
        else:
            order = 3
        # Karras sigmas with final_sigmas_type 'sigma_min' end on two equal sigmas (h = 0);
        # IEEE inf/0 then makes that step the identity, as it does in torch, without a warning.
        with np.errstate(divide="ignore", invalid="ignore"):
            prev = self._update(sample, order)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        return prev

    def _update(self, sample: np.ndarray, order: int) -> np.ndarray:
        """The multistep DPM-Solver++ update of ``order`` from sigma[i] to sigma[i + 1]."""
        i = self._step_index
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        points = [_alpha_sigma(self.sigmas[i - k]) for k in range(order)]  # s0, s1, s2
        lam_t = _lambda(alpha_t, sigma_t)
        lams = [_lambda(a, s) for a, s in points]
        sigma_s0 = points[0][1]
        h = lam_t - lams[0]
        em1 = np.exp(-h) - 1.0
        m = self.model_outputs
        x_t = (sigma_t / sigma_s0) * sample - (alpha_t * em1) * m[-1]
        if order == 1:
            return x_t
        r0 = (lams[0] - lams[1]) / h
        d1_0 = (1.0 / r0) * (m[-1] - m[-2])
        if order == 2:
            if self.config.solver_type == "midpoint":
                return x_t - 0.5 * (alpha_t * em1) * d1_0
            return x_t + (alpha_t * (em1 / h + 1.0)) * d1_0
        r1 = (lams[1] - lams[2]) / h
        d1_1 = (1.0 / r1) * (m[-2] - m[-3])
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        return x_t + (alpha_t * (em1 / h + 1.0)) * d1 - (alpha_t * ((em1 + h) / h**2 - 0.5)) * d2

    def _add_noise(self, original: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        alpha, sigma = _alpha_sigma(self._per_item(self.sigmas[self._noise_indices(timesteps)], original.ndim))
        return alpha * original + sigma * noise
