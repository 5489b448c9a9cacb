"""The numpy schedulers against diffusers' own, step for step, and their errors.

Parity: the same config dict goes to ``make_scheduler`` and to the diffusers
class's ``from_config``; both get the same model outputs and noise (diffusers'
``randn_tensor`` is patched in the scheduler's module to hand out ours), and
every timestep, sigma, scaled input, stepped sample and clean estimate must
agree to within TOLERANCE relative to the run's scale:

    |ours - ref| <= 1e-6 * S,  S = max(1, the largest |value| diffusers has produced so far in the run)

with TOLERANCE = 1e-6, except DDIM_DPM_TOLERANCE = 1e-5 for DDIM and DPM-Solver++:
on epsilon models their clean estimate ``(x - sqrt(1 - a) eps) / sqrt(a)``
divides by sqrt(a) = 0.068 at SD's t=999, magnifying last-bit differences
14-fold, and DDIM's 50-step runs pile up rounding (measured maxima: DDIM 1.9e-6
on epsilon and 1.01e-6 on v, DPM++ 5.6e-6 on epsilon and 4.5e-7 on v; Euler,
Euler-a, LCM and flow-match stay under 1e-6). So: 1e-6 absolute for unit-scale
latents, relative where magnitudes are large:
Euler's latents start at sigma_max (14.6 for SD, 4096 with zero terminal SNR,
20291 for the cosine schedule), and the float32 rounding both sides carry from
there does not shrink as the latents do. Integer timesteps must be equal. Both
sides do diffusers' float32 arithmetic, but torch's linspace, exp and pow round
differently from numpy's in the last bit, so results agree to a few float32 ulps,
not bit for bit. The model is a fake denoiser: it predicts (for diffusers' model input) the
noise, velocity or sample that points at a fixed clean latent, plus 10%
random error, and both sides get that same output; each side steps its own
sample, so differences compound over the run. (Purely random outputs make
epsilon models' clean estimates ~50x too large, and the float32 rounding of
those swamps any comparison.)
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from enginekit.errors import InputError, ShapeError
from enginekit.runtimes.schedulers import SCHEDULERS, make_scheduler

# diffusers' own np.array(tensor) calls warn under numpy 2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOLERANCE = 1e-6
DDIM_DPM_TOLERANCE = 1e-5

# The scheduler_config.json files of the pipelines the runtime targets, as published.
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
SD21 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SDXL = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
       "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
        "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}

# Our name -> (diffusers class, what the name fixes).
DIFFUSERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                "use_karras_sigmas": False}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                       "use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
# Our config fields that diffusers takes at step() instead.
STEP_ARGS = ("eta", "use_clipped_model_output")
SHAPE = (2, 4, 4, 4)


@pytest.fixture(scope="module")
def diffusers():
    mod = pytest.importorskip("diffusers")
    mod.utils.logging.set_verbosity_error()  # from_config warns about every PNDM-only key
    return mod


def _close(name: str, ours, ref, scale: float = 1.0, tolerance: float = TOLERANCE) -> float:
    """Assert ours ~ ref (see the module docstring); returns the run's scale including ref."""
    ref = np.asarray(ref, dtype=np.float64)
    ours = np.asarray(ours, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    scale = max(scale, float(np.abs(ref).max())) if ref.size else scale
    err = float(np.abs(ours - ref).max()) if ref.size else 0.0
    assert err <= tolerance * scale, f"{name}: max |ours - ref| = {err:.3g} (scale {scale:.3g})"
    return scale


def _timesteps_match(ours: np.ndarray, ref) -> None:
    ref = ref.numpy()
    if np.issubdtype(ref.dtype, np.integer):
        np.testing.assert_array_equal(ours, ref)
        assert np.issubdtype(ours.dtype, np.integer)
    else:
        _close("timesteps", ours, ref)


def _fake_model(ref, name: str, i: int, x_in: np.ndarray, target: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """What a decent model would output at step i for the input x_in: aimed at ``target``, 10% off."""
    error = 0.1 * rng.standard_normal(SHAPE)
    if name == "flow-euler":
        sigma = float(ref.sigmas[i])
        velocity = (x_in - target) / sigma if sigma > 1e-3 else rng.standard_normal(SHAPE)
        return (velocity + error).astype(np.float32)
    if name in ("ddim", "lcm"):
        alpha_bar = float(ref.alphas_cumprod[int(ref.timesteps[i])])
        alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    else:  # sigma-space schedulers; x_in is the unit-variance model input
        alpha = 1 / (float(ref.sigmas[i]) ** 2 + 1) ** 0.5
        sigma = float(ref.sigmas[i]) * alpha
    eps = (x_in - alpha * target) / sigma
    kind = ref.config.prediction_type
    out = eps if kind == "epsilon" else alpha * eps - sigma * target if kind == "v_prediction" else target
    return (out + error).astype(np.float32)


def parity(diffusers, monkeypatch, name: str, config: dict, n: int, *, begin: int | None = None,
           mu: float | None = None, seed: int = 0, **overrides) -> None:
    """Run ``name`` and its diffusers twin side by side over a whole schedule."""
    import torch

    cls_name, pinned = DIFFUSERS[name]
    ref_cls = getattr(diffusers, cls_name)
    step_args = {k: overrides[k] for k in STEP_ARGS if k in overrides}
    ref = ref_cls.from_config(config, **{**pinned, **{k: v for k, v in overrides.items() if k not in STEP_ARGS}})
    ours = make_scheduler(name, config, **overrides)

    # Hand diffusers our noise wherever it would draw its own.
    holder: dict[str, np.ndarray] = {}
    module = sys.modules[ref_cls.__module__]
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(holder["noise"]).reshape(shape))

    ref.set_timesteps(n, **({"mu": mu} if mu is not None else {}))
    ours.set_timesteps(n, mu=mu)
    _timesteps_match(ours.timesteps, ref.timesteps)
    if hasattr(ref, "sigmas") and name != "ddim":
        _close("sigmas", ours.sigmas, ref.sigmas.numpy(), scale=float(ref.sigmas.abs().max()))
    init_sigma = float(getattr(ref, "init_noise_sigma", 1.0))
    scale = _close("init_noise_sigma", ours.init_noise_sigma, init_sigma)

    rng = np.random.default_rng(seed)
    tol = DDIM_DPM_TOLERANCE if name in ("ddim", "dpm++2m", "dpm++2m-karras") else TOLERANCE
    timesteps = list(range(len(ours.timesteps)))
    if begin is None:
        x_ref = x_ours = (rng.standard_normal(SHAPE) * init_sigma).astype(np.float32)
        x_ref = torch.from_numpy(x_ref)
    else:
        # Image-to-image: noise a clean latent to timesteps[begin] and start there.
        clean = rng.standard_normal(SHAPE).astype(np.float32)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(begin)
        ours.set_begin_index(begin)
        t_batch = ref.timesteps[begin: begin + 1].repeat(SHAPE[0])
        adder = ref.scale_noise if name == "flow-euler" else ref.add_noise
        x_ref = adder(torch.from_numpy(clean), t_batch, torch.from_numpy(noise)) if name == "flow-euler" \
            else adder(torch.from_numpy(clean), torch.from_numpy(noise), t_batch)
        x_ours = ours.add_noise(clean, noise, np.repeat(ours.timesteps[begin], SHAPE[0]))
        scale = _close("add_noise", x_ours, x_ref.numpy(), scale)
        timesteps = timesteps[begin:]

    target = (rng.standard_normal(SHAPE) * 0.5).astype(np.float32)
    for i in timesteps:
        t_ref, t_ours = ref.timesteps[i], ours.timesteps[i]
        # FlowMatch has no scale_model_input: its models take the sample as is.
        scaled_ref = ref.scale_model_input(x_ref, t_ref) if hasattr(ref, "scale_model_input") else x_ref
        scaled_ours = ours.scale_model_input(x_ours, t_ours)
        assert scaled_ours.dtype == np.float32 and scaled_ours.shape == SHAPE
        scale = _close(f"scale_model_input at step {i}", scaled_ours, scaled_ref.numpy(), scale, tol)
        model_out = _fake_model(ref, name, i, scaled_ref.numpy(), target, rng)
        holder["noise"] = rng.standard_normal(SHAPE).astype(np.float32)
        if step_args.get("eta", 0) > 0:
            step_args["variance_noise"] = torch.from_numpy(holder["noise"])
        out = ref.step(torch.from_numpy(model_out), t_ref, x_ref, **step_args)
        x_ref = out.prev_sample
        x_ours = ours.step(model_out, t_ours, x_ours, noise=holder["noise"] if ours.stochastic else None)
        assert x_ours.dtype == np.float32 and x_ours.shape == SHAPE
        scale = _close(f"{name} step {i} of {n}", x_ours, x_ref.numpy(), scale, tol)
        denoised = getattr(out, "denoised", None)
        if denoised is None:
            denoised = getattr(out, "pred_original_sample", None)
        if denoised is not None:
            scale = _close(f"denoised at step {i}", ours.denoised, denoised.numpy(), scale, tol)
    assert np.isfinite(x_ours).all()


# -- parity: every scheduler on the SD configs ----------------------------------------------

SD_SCHEDULERS = ["euler", "euler-a", "ddim", "dpm++2m", "dpm++2m-karras", "lcm"]
PREDICTIONS = ["epsilon", "v_prediction"]
SPACINGS = ["linspace", "leading", "trailing"]
# SD 2.1's file says v_prediction; SD 1.5 with v would repeat it.
CONFIG_PREDICTIONS = [("sd15", "epsilon"), ("sd21", "v_prediction"), ("sdxl", "epsilon"), ("sdxl", "v_prediction")]


@pytest.mark.parametrize("name", SD_SCHEDULERS)
@pytest.mark.parametrize("config, prediction", CONFIG_PREDICTIONS)
def test_parity_sd_configs(diffusers, monkeypatch, name: str, config: str, prediction: str) -> None:
    for spacing, n in itertools.product(SPACINGS, [1, 4, 25]):
        parity(diffusers, monkeypatch, name, CONFIGS[config], n, prediction_type=prediction, timestep_spacing=spacing)


@pytest.mark.parametrize("name", SD_SCHEDULERS)
@pytest.mark.parametrize("n", [20, 50])
def test_parity_long_schedules(diffusers, monkeypatch, name: str, n: int) -> None:
    parity(diffusers, monkeypatch, name, SD15, n)
    parity(diffusers, monkeypatch, name, SD21, n, timestep_spacing="trailing")


@pytest.mark.parametrize("name", SD_SCHEDULERS)
def test_parity_image_to_image(diffusers, monkeypatch, name: str) -> None:
    for config, n, begin in [(SD15, 25, 10), (SDXL, 20, 5), (SD21, 4, 1), (SD15, 4, 3)]:
        parity(diffusers, monkeypatch, name, config, n, begin=begin)


@pytest.mark.parametrize("name", ["euler", "euler-a", "ddim", "dpm++2m", "lcm"])
def test_parity_zero_snr_trailing(diffusers, monkeypatch, name: str) -> None:
    # The "Common Diffusion Noise Schedules" recipe: zero terminal SNR, trailing, v-prediction.
    for n in (4, 25):
        parity(diffusers, monkeypatch, name, SD21, n, rescale_betas_zero_snr=True, timestep_spacing="trailing")


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("name", SD_SCHEDULERS)
def test_parity_beta_schedules(diffusers, monkeypatch, name: str, schedule: str) -> None:
    config = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": schedule, "num_train_timesteps": 1000}
    if name == "dpm++2m-karras" and schedule == "squaredcos_cap_v2":
        # Karras sigmas on the cosine schedule start with four timesteps of 998, so diffusers'
        # first lookup takes the second match and its last step overruns the sigmas (IndexError).
        # Ours keeps the same bookkeeping and says so instead.
        ref = diffusers.DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
        ours = make_scheduler(name, config)
        ref.set_timesteps(10)
        ours.set_timesteps(10)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
        x = np.zeros(SHAPE, np.float32)
        with pytest.raises(InputError, match="past the last"):
            for t in ours.timesteps:
                x = ours.step(x, t, x)
        return
    for prediction in PREDICTIONS:
        parity(diffusers, monkeypatch, name, config, 10, prediction_type=prediction)


@pytest.mark.parametrize("overrides", [
    {"use_karras_sigmas": True},
    {"use_karras_sigmas": True, "sigma_min": 0.03, "sigma_max": 10.0},
    {"use_exponential_sigmas": True},
    {"final_sigmas_type": "sigma_min"},
    {"interpolation_type": "log_linear"},
    {"timestep_type": "continuous", "prediction_type": "v_prediction"},
    {"prediction_type": "sample"},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_parity_euler_options(diffusers, monkeypatch, overrides: dict) -> None:
    for config, n in [(SDXL, 4), (SDXL, 30), (SD15, 13)]:
        parity(diffusers, monkeypatch, "euler", config, n, **overrides)


@pytest.mark.parametrize("overrides", [
    {"eta": 0.0, "clip_sample": True},
    {"eta": 1.0},
    {"eta": 0.3, "use_clipped_model_output": True, "clip_sample": True, "clip_sample_range": 0.5},
    {"thresholding": True, "sample_max_value": 1.5},
    {"set_alpha_to_one": True, "prediction_type": "sample"},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_parity_ddim_options(diffusers, monkeypatch, overrides: dict) -> None:
    for n, spacing in [(10, "leading"), (7, "trailing"), (25, "linspace")]:
        parity(diffusers, monkeypatch, "ddim", SD15, n, timestep_spacing=spacing, **overrides)


@pytest.mark.parametrize("overrides", [
    {"solver_type": "heun"},
    {"final_sigmas_type": "sigma_min"},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
    {"thresholding": True, "sample_max_value": 1.5, "prediction_type": "sample"},
    {"lambda_min_clipped": -5.1},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_parity_dpm_options(diffusers, monkeypatch, overrides: dict) -> None:
    for name, n in [("dpm++2m", 10), ("dpm++2m", 20), ("dpm++2m-karras", 16)]:
        parity(diffusers, monkeypatch, name, SD15, n, **overrides)


def test_parity_dpm_other_orders(diffusers, monkeypatch) -> None:
    for order, n in itertools.product([1, 3], [5, 20]):
        parity(diffusers, monkeypatch, "dpm++2m", SD15, n, solver_order=order)
        parity(diffusers, monkeypatch, "dpm++2m-karras", SDXL, n, solver_order=order, prediction_type="v_prediction")


def test_parity_lcm_options(diffusers, monkeypatch) -> None:
    parity(diffusers, monkeypatch, "lcm", SD15, 8, original_inference_steps=100)
    parity(diffusers, monkeypatch, "lcm", SD15, 6, clip_sample=True, prediction_type="sample")
    parity(diffusers, monkeypatch, "lcm", SD15, 6, thresholding=True, set_alpha_to_one=False)


def test_lcm_image_to_image_strength(diffusers) -> None:
    # diffusers' LCM img2img pipeline asks for a schedule cut to `strength` of the teacher's.
    for n, strength, original in [(4, 0.5, 50), (8, 0.3, 100), (2, 1.0, 50)]:
        ref = diffusers.LCMScheduler.from_config(SD15)
        ours = make_scheduler("lcm", SD15)
        ref.set_timesteps(n, original_inference_steps=original, strength=strength)
        ours.set_timesteps(n, original_inference_steps=original, strength=strength)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    with pytest.raises(InputError, match="strength"):
        ours.set_timesteps(4, strength=0.0)


# -- parity: flow matching (SD3, FLUX) ------------------------------------------------------

@pytest.mark.parametrize("n", [1, 4, 20, 28, 50])
def test_parity_flow_sd3_shift(diffusers, monkeypatch, n: int) -> None:
    parity(diffusers, monkeypatch, "flow-euler", SD3, n)
    parity(diffusers, monkeypatch, "flow-euler", SD3, n, begin=n // 2)


@pytest.mark.parametrize("n", [1, 4, 28, 50])
def test_parity_flow_flux_dynamic_shift(diffusers, monkeypatch, n: int) -> None:
    for mu in (0.5, 1.15, 0.8):
        parity(diffusers, monkeypatch, "flow-euler", FLUX, n, mu=mu)
    parity(diffusers, monkeypatch, "flow-euler", FLUX, n, mu=1.0, time_shift_type="linear")
    parity(diffusers, monkeypatch, "flow-euler", FLUX, n, mu=0.9, begin=n - 1)


@pytest.mark.parametrize("overrides", [
    {"shift_terminal": 0.1},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"invert_sigmas": True},
    {"stochastic_sampling": True},
    {"shift": 1.0},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_parity_flow_options(diffusers, monkeypatch, overrides: dict) -> None:
    for n in (4, 25):
        parity(diffusers, monkeypatch, "flow-euler", SD3, n, **overrides)


def test_flow_custom_sigmas_and_mu_for_match_flux_pipeline(diffusers) -> None:
    # FLUX's pipeline passes its own linear sigmas, and mu from the latent sequence length:
    # linear from (256 tokens, 0.5) to (4096, 1.15), as its calculate_shift has it.
    ours = make_scheduler("flow-euler", FLUX)
    assert ours.mu_for(256) == pytest.approx(0.5) and ours.mu_for(4096) == pytest.approx(1.15)
    mu = ours.mu_for((1024 // 16) ** 2)
    assert mu == pytest.approx(0.5 + (4096 - 256) * 0.65 / 3840)
    ref = diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX)
    sigmas = np.linspace(1.0, 1 / 28, 28)
    ref.set_timesteps(28, sigmas=sigmas, mu=mu)
    ours.set_timesteps(28, mu=mu, sigmas=sigmas)
    _close("timesteps", ours.timesteps, ref.timesteps.numpy())
    _close("sigmas", ours.sigmas, ref.sigmas.numpy())


def test_add_noise_by_timestep_lookup(diffusers) -> None:
    # Without a begin index, add_noise looks each timestep up (one per batch item).
    import torch

    rng = np.random.default_rng(3)
    clean = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    for name in SCHEDULERS:
        cls_name, pinned = DIFFUSERS[name]
        config = SD3 if name == "flow-euler" else SD15
        ref = getattr(diffusers, cls_name).from_config(config, **pinned)
        ours = make_scheduler(name, config)
        ref.set_timesteps(10)
        ours.set_timesteps(10)
        picks = [0, 3, 7, 9][: SHAPE[0]]
        t_ref = ref.timesteps[picks]
        if name == "flow-euler":
            expected = ref.scale_noise(torch.from_numpy(clean), t_ref, torch.from_numpy(noise))
        else:
            expected = ref.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), t_ref)
        _close(f"{name} add_noise", ours.add_noise(clean, noise, ours.timesteps[picks]), expected.numpy())
        # A scalar timestep noises the whole batch alike.
        one = ours.add_noise(clean, noise, ours.timesteps[3])
        _close(f"{name} add_noise scalar", one, ours.add_noise(clean, noise, np.repeat(ours.timesteps[3], SHAPE[0])))


def test_pndm_config_object_round_trip(diffusers, monkeypatch) -> None:
    # pipe.scheduler.config carries PNDM's defaults too, marked in _use_default_values.
    config = dict(diffusers.PNDMScheduler.from_config(SD15).config)
    assert "timestep_spacing" in config["_use_default_values"]
    for name in SD_SCHEDULERS:
        parity(diffusers, monkeypatch, name, config, 10)


# -- behaviour that needs no diffusers -------------------------------------------------------


def test_names_and_factory_types() -> None:
    assert SCHEDULERS == ("euler", "euler-a", "ddim", "dpm++2m", "dpm++2m-karras", "lcm", "flow-euler")
    karras = make_scheduler("dpm++2m-karras", SD15)
    assert karras.config.use_karras_sigmas and karras.config.solver_order == 2
    # The name fixes the solver over the file; an explicit override still wins.
    assert not make_scheduler("dpm++2m", {**SD15, "use_karras_sigmas": True}).config.use_karras_sigmas
    assert make_scheduler("euler", {**SDXL, "use_karras_sigmas": True}).config.use_karras_sigmas
    assert make_scheduler("ddim", SD15).config.timestep_spacing == "leading"  # DDIM's own default
    assert make_scheduler("euler", SD15).config.timestep_spacing == "linspace"
    assert make_scheduler("ddim", SD15, eta=0.5).stochastic
    assert all(make_scheduler(n, SD15).order == 1 for n in SCHEDULERS)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(InputError) as err:
        make_scheduler("heun", SD15)
    message = str(err.value)
    assert "\n" not in message and "'heun'" in message
    assert all(name in message for name in SCHEDULERS)


@pytest.mark.parametrize("name, overrides, field", [
    ("euler", {"beta_schedule": "cosine"}, "beta_schedule"),
    ("ddim", {"timestep_spacing": "uniform"}, "timestep_spacing"),
    ("dpm++2m", {"prediction_type": "flow"}, "prediction_type"),
    ("euler-a", {"prediction_type": "sample"}, "prediction_type"),
    ("dpm++2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpm++2m", {"solver_order": 4}, "solver_order"),
    ("euler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("flow-euler", {"time_shift_type": "cubic"}, "time_shift_type"),
    ("lcm", {"num_train_timesteps": 1}, "num_train_timesteps"),
    ("ddim", {"eta": -1.0}, "eta"),
    ("euler", {"stepz": 3}, "stepz"),
])
def test_bad_settings_name_the_field(name: str, overrides: dict, field: str) -> None:
    with pytest.raises(InputError) as err:
        make_scheduler(name, SD3 if name == "flow-euler" else SD15, **overrides)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_bad_values_in_the_config_file_are_caught_too() -> None:
    with pytest.raises(InputError, match="beta_schedule"):
        make_scheduler("euler", {**SD15, "beta_schedule": "sqrt"})
    with pytest.raises(InputError, match="config must be a dict"):
        make_scheduler("euler", "scheduler_config.json")


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("n", [0, -3, 1001, 2.5, True])
def test_num_inference_steps_out_of_range(name: str, n) -> None:
    sched = make_scheduler(name, SD3 if name == "flow-euler" else SD15)
    with pytest.raises(InputError, match="num_inference_steps"):
        sched.set_timesteps(n)


def test_step_errors() -> None:
    x = np.zeros(SHAPE, np.float32)
    sched = make_scheduler("euler", SD15)
    with pytest.raises(InputError, match="set_timesteps"):
        sched.step(x, 999.0, x)
    sched.set_timesteps(4)
    with pytest.raises(InputError, match="not in this schedule"):
        sched.step(x, 123.5, x)
    with pytest.raises(ShapeError, match="must match"):
        sched.step(x[:1], sched.timesteps[0], x)
    with pytest.raises(InputError, match="mu"):
        sched.set_timesteps(4, mu=0.5)
    lcm = make_scheduler("lcm", SD15)
    with pytest.raises(InputError, match="original_inference_steps"):
        lcm.set_timesteps(60)
    flux = make_scheduler("flow-euler", FLUX)
    with pytest.raises(InputError, match="mu must be passed"):
        flux.set_timesteps(4)
    with pytest.raises(InputError, match="begin_index"):
        sched.set_begin_index(9)


@pytest.mark.parametrize("name, overrides", [
    ("euler-a", {}), ("lcm", {}), ("ddim", {"eta": 0.5}), ("flow-euler", {"stochastic_sampling": True}),
])
def test_stochastic_steps_need_noise(name: str, overrides: dict) -> None:
    sched = make_scheduler(name, SD3 if name == "flow-euler" else SD15, **overrides)
    assert sched.stochastic
    sched.set_timesteps(4)
    x = np.ones(SHAPE, np.float32)
    with pytest.raises(InputError, match="noise"):
        sched.step(x, sched.timesteps[0], x)
    # The same step with noise goes through, and deterministic schedulers need none.
    sched.step(x, sched.timesteps[0], x, noise=np.zeros(SHAPE, np.float32))
    plain = make_scheduler("euler", SD15)
    plain.set_timesteps(4)
    assert not plain.stochastic and plain.step(x, plain.timesteps[0], x).dtype == np.float32


def test_final_steps_that_add_no_noise_need_none() -> None:
    # Euler-a's and LCM's last steps land on the clean sample.
    for name in ("euler-a", "lcm"):
        sched = make_scheduler(name, SD15)
        sched.set_timesteps(2)
        x = np.ones(SHAPE, np.float32)
        x = sched.step(x, sched.timesteps[0], x, noise=np.zeros(SHAPE, np.float32))
        assert sched.step(x, sched.timesteps[1], x).shape == SHAPE


def test_runtime_path_imports_no_torch() -> None:
    code = textwrap.dedent(
        """
        import json, sys
        BLOCKED = {"torch", "diffusers", "scipy", "transformers"}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from enginekit.runtimes.schedulers import SCHEDULERS, make_scheduler
        cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "shift": 3.0}
        rng = np.random.default_rng(0)
        for name in SCHEDULERS:
            s = make_scheduler(name, cfg)
            s.set_timesteps(3)
            x = rng.standard_normal((1, 4, 2, 2)).astype(np.float32) * s.init_noise_sigma
            for t in s.timesteps:
                noise = rng.standard_normal(x.shape) if s.stochastic else None
                x = s.step(rng.standard_normal(x.shape), t, x, noise=noise)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
