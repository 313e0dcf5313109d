"""Diffusion maths as pure functions: schedules, timestep sampling, objectives, samplers, guidance.

- :mod:`vdm.diffusion.flow`: rectified flow ``x_t = (1 - t) x0 + t noise``, velocity target
  ``noise - x0``, logit-normal / uniform times, SD3 timestep shift.
- :mod:`vdm.diffusion.ddpm`: beta schedules, zero terminal SNR, ``q_sample``, eps / v
  parametrisations, integer index <-> continuous time ``t = (i + 1) / N``.
- :mod:`vdm.diffusion.losses`: per-sample (B,) weighted MSE, min-SNR and CosMap weightings.
- :mod:`vdm.diffusion.guidance`: classifier-free guidance as one batched model call.
- :mod:`vdm.diffusion.samplers`: Euler / Heun (flow), DDIM with eta (DDPM), SDEdit starts.

Tensors are (B, ...) (latent videos ``B C T H W``); per-sample times are float (B,) in [0, 1],
``t = 1`` being pure noise for both objectives; denoisers are ``denoiser(x, t) -> prediction``.
"""

from vdm.diffusion.common import Denoiser, expand_like
from vdm.diffusion.ddpm import (
    DDPMSchedule,
    PredictionType,
    alpha_sigma,
    cosine_betas,
    ddim_timesteps,
    ddpm_target,
    ddpm_time,
    ddpm_timesteps_from_time,
    linear_betas,
    make_ddpm_schedule,
    prediction_to_x0_eps,
    q_sample,
    rescale_zero_terminal_snr,
    sample_ddpm_timesteps,
    scaled_linear_betas,
    snr,
    v_target,
    x0_eps_from_prediction,
)
from vdm.diffusion.flow import (
    flow_interpolate,
    flow_snr,
    flow_target,
    flow_timesteps,
    flow_velocity_to_noise,
    flow_velocity_to_x0,
    sample_flow_time,
    shift_for_num_tokens,
    shift_timesteps,
)
from vdm.diffusion.guidance import guided_denoiser
from vdm.diffusion.losses import (
    ddpm_loss,
    ddpm_loss_weight,
    flow_loss,
    flow_loss_weight,
    min_snr_weight,
    weighted_mse,
)
from vdm.diffusion.samplers import (
    ddim_sample,
    ddim_step,
    euler_sample,
    heun_sample,
    sdedit_ddpm_start,
    sdedit_flow_start,
)

__all__ = [
    "DDPMSchedule",
    "Denoiser",
    "PredictionType",
    "alpha_sigma",
    "cosine_betas",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_loss",
    "ddpm_loss_weight",
    "ddpm_target",
    "ddpm_time",
    "ddpm_timesteps_from_time",
    "euler_sample",
    "expand_like",
    "flow_interpolate",
    "flow_loss",
    "flow_loss_weight",
    "flow_snr",
    "flow_target",
    "flow_timesteps",
    "flow_velocity_to_noise",
    "flow_velocity_to_x0",
    "guided_denoiser",
    "heun_sample",
    "linear_betas",
    "make_ddpm_schedule",
    "min_snr_weight",
    "prediction_to_x0_eps",
    "q_sample",
    "rescale_zero_terminal_snr",
    "sample_ddpm_timesteps",
    "sample_flow_time",
    "scaled_linear_betas",
    "sdedit_ddpm_start",
    "sdedit_flow_start",
    "shift_for_num_tokens",
    "shift_timesteps",
    "snr",
    "v_target",
    "weighted_mse",
    "x0_eps_from_prediction",
]
