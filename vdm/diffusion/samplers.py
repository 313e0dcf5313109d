"""Samplers: Euler and Heun for rectified flow, DDIM for DDPM, and SDEdit starts for video-to-video.

Model interface: ``denoiser(x, t) -> prediction`` with ``x`` (B, ...) and ``t`` float (B,) in
[0, 1] (the flow time, or :func:`vdm.diffusion.ddpm.ddpm_time` of the DDPM index); wrap a
conditional model with :func:`vdm.diffusion.guidance.guided_denoiser` for classifier-free
guidance. Flow denoisers predict the velocity ``noise - x0``; DDPM denoisers predict eps or v.

Every sampler takes its starting noise as a tensor (draw it with a seeded ``torch.Generator``);
DDIM with ``eta > 0`` also draws per-step noise from ``generator``. Given those, results are
deterministic. The samplers leave autograd as it is (so they can be differentiated through); call
them under ``torch.no_grad()`` for inference.

SDEdit (Meng et al. 2022): with ``init`` (a clean latent) and ``strength`` in [0, 1], sampling
starts from ``init`` noised to the time that ``strength`` selects: strength 1 is pure noise
(ordinary generation, ``init`` ignored), strength 0 returns ``init`` unchanged.
"""

from __future__ import annotations

import math

import torch

from vdm.diffusion.common import Denoiser, Generators, full_time, randn
from vdm.diffusion.ddpm import (
    DDPMSchedule,
    PredictionType,
    Spacing,
    ddim_timesteps,
    ddpm_time,
    q_sample,
    x0_eps_from_prediction,
)
from vdm.diffusion.flow import flow_interpolate, flow_timesteps, shift_timesteps


def _check_strength(strength: float, init: torch.Tensor | None) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if init is None and strength != 1.0:
        raise ValueError(f"strength {strength} < 1 needs an init latent to start from (SDEdit)")


def sdedit_flow_start(
    init: torch.Tensor, noise: torch.Tensor, strength: float, shift: float = 1.0
) -> tuple[torch.Tensor, float]:
    """Noise ``init`` (B, ...) to the flow start time ``t0 = shift_timesteps(strength, shift)``.

    Returns ``((1 - t0) init + t0 noise, t0)``: the first point of
    ``flow_timesteps(num_steps, shift, strength)``.
    """
    _check_strength(strength, init)
    t0 = float(shift_timesteps(strength, shift))
    return flow_interpolate(init, noise, full_time(t0, init)), t0


def _flow_start(
    noise: torch.Tensor, num_steps: int, shift: float, init: torch.Tensor | None, strength: float
) -> tuple[torch.Tensor, list[float]]:
    """Starting state and the schedule as Python floats (float64 precision for the step sizes)."""
    _check_strength(strength, init)
    times = flow_timesteps(num_steps, shift, strength, dtype=torch.float64).tolist()
    if init is None or strength == 1.0:
        return noise, times
    return sdedit_flow_start(init, noise, strength, shift)[0], times


def euler_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    num_steps: int,
    shift: float = 1.0,
    *,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Integrate the flow ODE from ``t0`` to 0 with ``num_steps`` Euler steps (one call each).

    ``noise`` (B, ...) is the state at t = 1; the schedule is :func:`flow_timesteps`. Returns x0.
    """
    if init is not None and strength == 0.0:
        return init
    x, times = _flow_start(noise, num_steps, shift, init, strength)
    for t_cur, t_next in zip(times[:-1], times[1:], strict=True):
        x = x + (t_next - t_cur) * denoiser(x, full_time(t_cur, x))
    return x


def heun_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    num_steps: int,
    shift: float = 1.0,
    *,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1): ``2 num_steps - 1`` calls.

    Each step averages the velocity at both ends of an Euler step; the last step (to t = 0) is a
    plain Euler step, as in EDM. Arguments as for :func:`euler_sample`.
    """
    if init is not None and strength == 0.0:
        return init
    x, times = _flow_start(noise, num_steps, shift, init, strength)
    for t_cur, t_next in zip(times[:-1], times[1:], strict=True):
        dt = t_next - t_cur
        v = denoiser(x, full_time(t_cur, x))
        x_euler = x + dt * v
        if t_next > 0:
            v_next = denoiser(x_euler, full_time(t_next, x))
            x_euler = x + (0.5 * dt) * (v + v_next)
        x = x_euler
    return x


def sdedit_ddpm_start(
    schedule: DDPMSchedule,
    init: torch.Tensor,
    noise: torch.Tensor,
    strength: float,
    num_steps: int,
    spacing: Spacing = "trailing",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``init`` to the first index of ``ddim_timesteps(N, num_steps, spacing, strength)``.

    Returns ``(x_start, timesteps)`` with timesteps (S,) int64 decreasing. Strength 1 returns the
    noise itself (generation from scratch); strength 0 (empty schedule) returns ``init``.
    """
    _check_strength(strength, init)
    steps = ddim_timesteps(schedule.num_train_steps, num_steps, spacing, strength)
    if steps.numel() == 0:
        return init, steps
    if strength == 1.0:
        return noise, steps
    start = torch.full((init.shape[0],), int(steps[0]), dtype=torch.long, device=init.device)
    return q_sample(schedule, init, noise, start), steps


def ddim_step(
    x: torch.Tensor,
    prediction: torch.Tensor,
    acp: float,
    acp_prev: float,
    prediction_type: PredictionType,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update (Song et al. 2021, Eq. 12) from ``alphas_cumprod = acp`` to ``acp_prev``.

    ``sigma = eta sqrt((1 - acp_prev) / (1 - acp)) sqrt(1 - acp / acp_prev)``; eta = 0 is the
    deterministic DDIM, eta = 1 the DDPM ancestral step. ``acp_prev = 1`` returns the x0 estimate.
    ``noise`` (like x) is required when sigma > 0.
    """
    alpha = torch.full((x.shape[0],), math.sqrt(acp), dtype=torch.float64, device=x.device)
    sigma_t = torch.full((x.shape[0],), math.sqrt(1 - acp), dtype=torch.float64, device=x.device)
    x0, eps = x0_eps_from_prediction(x, prediction.to(x.dtype), alpha, sigma_t, prediction_type)
    sigma = eta * math.sqrt((1 - acp_prev) / (1 - acp) * (1 - acp / acp_prev))
    # max(.., 0): 1 - acp_prev - sigma^2 is exactly 0 at eta = 1 and may round below it
    x_prev = math.sqrt(acp_prev) * x0 + math.sqrt(max(1 - acp_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("eta > 0 needs noise for the stochastic part of the step")
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_sample(
    denoiser: Denoiser,
    schedule: DDPMSchedule,
    noise: torch.Tensor,
    num_steps: int,
    *,
    prediction_type: PredictionType = "v",
    eta: float = 0.0,
    spacing: Spacing = "trailing",
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    generator: Generators | None = None,
) -> torch.Tensor:
    """DDIM / ancestral sampling over ``ddim_timesteps(N, num_steps, spacing, strength)``.

    ``noise`` (B, ...) is the starting state at the first timestep (the forward process's last
    state, treated as pure noise; exact with zero terminal SNR and ``trailing`` spacing). The
    denoiser gets ``t = ddpm_time(i, N)``. The last step goes to ``alphas_cumprod = 1`` (returns
    the x0 estimate). Per-step noise for ``eta > 0`` comes from ``generator`` (global RNG if None).
    eps prediction cannot start at zero SNR (x0 is not recoverable there): use v prediction or
    a schedule without zero terminal SNR.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if init is not None:
        x, steps = sdedit_ddpm_start(schedule, init, noise, strength, num_steps, spacing)
    else:
        _check_strength(strength, init)
        x, steps = noise, ddim_timesteps(schedule.num_train_steps, num_steps, spacing, strength)
    acps = schedule.alphas_cumprod.cpu()[steps].tolist() + [1.0]
    if prediction_type == "eps" and acps and acps[0] <= 0:
        raise ValueError("eps prediction cannot sample from zero terminal SNR; use prediction_type='v'")
    for i, step in enumerate(steps.tolist()):
        t = ddpm_time(torch.full((x.shape[0],), step, device=x.device), schedule.num_train_steps, x.dtype)
        prediction = denoiser(x, t)
        sigma_needed = eta > 0 and acps[i + 1] < 1.0
        step_noise = randn(x.shape, generator, x.device, x.dtype) if sigma_needed else None
        x = ddim_step(x, prediction, acps[i], acps[i + 1], prediction_type, eta, step_noise)
    return x


__all__ = [
    "ddim_sample",
    "ddim_step",
    "euler_sample",
    "heun_sample",
    "sdedit_ddpm_start",
    "sdedit_flow_start",
]
