"""Discrete DDPM: beta schedules, forward noising, eps / v parametrisations, timestep mappings.

Conventions (relied on by the training module and the samplers):

- Integer timesteps ``i`` in ``[0, N)`` (``N = num_train_steps``) index ``alphas_cumprod``;
  ``x_i = alpha_i x0 + sigma_i eps`` with ``alpha_i = sqrt(alphas_cumprod[i])`` and
  ``sigma_i = sqrt(1 - alphas_cumprod[i])`` (variance preserving, Ho et al. 2020).
- Predictions: ``eps`` (the noise) or ``v = alpha eps - sigma x0`` (Salimans & Ho 2022).
  Conversions: ``x0 = (x - sigma eps) / alpha`` and ``eps = (x - alpha x0) / sigma`` for eps;
  ``x0 = alpha x - sigma v`` and ``eps = sigma x + alpha v`` for v.
- Continuous model time: ``t = (i + 1) / N`` (:func:`ddpm_time`). Index ``i`` is the noise level
  after ``i + 1`` forward steps, so ``t = 0`` is clean data and the last index is ``t = 1`` (pure
  noise under zero terminal SNR), the same orientation as rectified flow: one DiT timestep embedder
  serves both objectives. The inverse is ``i = round(t N) - 1`` (:func:`ddpm_timesteps_from_time`).
- Schedules are computed in float64 and stored in float64 (N values, negligible memory); gathered
  values are cast to the data's dtype where they meet data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from vdm.diffusion.common import expand_like, time_dtype

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
PredictionType = Literal["eps", "v"]
Spacing = Literal["trailing", "linspace", "leading"]


def linear_betas(num_train_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM linear betas (Ho et al. 2020): ``linspace(beta_start, beta_end, N)``, float64 (N,)."""
    return torch.linspace(beta_start, beta_end, num_train_steps, dtype=torch.float64)


def scaled_linear_betas(
    num_train_steps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Latent-diffusion betas (Rombach et al. 2022): ``linspace(sqrt(b0), sqrt(b1), N)^2``, float64."""
    roots = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_steps, dtype=torch.float64)
    return roots**2


def cosine_betas(num_train_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine betas (Nichol & Dhariwal 2021, Eq. 17): ``1 - f(i+1) / f(i)`` clipped at ``max_beta``.

    ``f(u) = cos(((u / N) + s) / (1 + s) * pi / 2)^2``, so ``alphas_cumprod[i] = f(i + 1) / f(0)``
    up to the clipping of the last betas (which keeps them below 1 at the terminal step).
    """
    steps = torch.arange(num_train_steps + 1, dtype=torch.float64)
    f = torch.cos((steps / num_train_steps + s) / (1 + s) * math.pi / 2) ** 2
    return torch.clamp(1 - f[1:] / f[:-1], max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last step has SNR 0 (Lin et al. 2024, Algorithm 1).

    ``sqrt(alphas_cumprod)`` is shifted so its last value is 0 and scaled so its first value is
    unchanged (the first SNR is kept). Without this, training never sees pure noise while sampling
    starts from it, which biases generations towards medium brightness.
    """
    sqrt_acp = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = sqrt_acp[0].clone(), sqrt_acp[-1].clone()
    sqrt_acp = (sqrt_acp - last) * first / (first - last)
    acp = sqrt_acp**2
    alphas = torch.cat([acp[:1], acp[1:] / acp[:-1]])
    return 1 - alphas


@dataclass(frozen=True, eq=False)
class DDPMSchedule:
    """Immutable noise schedule: ``alphas_cumprod`` (N,) float64, decreasing from ~1 to ~0 (or 0)."""

    alphas_cumprod: torch.Tensor
    # copies of alphas_cumprod on other devices, made once each (a copy per step would block the host)
    _copies: dict[str, torch.Tensor] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        acp = self.alphas_cumprod
        if acp.ndim != 1 or acp.numel() < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(acp.shape)}")
        if acp.dtype != torch.float64:
            object.__setattr__(self, "alphas_cumprod", acp.double())

    @property
    def num_train_steps(self) -> int:
        """Number of training timesteps N."""
        return self.alphas_cumprod.numel()

    def on(self, device: torch.device | str) -> torch.Tensor:
        """``alphas_cumprod`` on ``device``, copied there on first use only."""
        device = torch.device(device)
        if self.alphas_cumprod.device == device:
            return self.alphas_cumprod
        key = str(device)
        if key not in self._copies:
            self._copies[key] = self.alphas_cumprod.to(device)
        return self._copies[key]


def make_ddpm_schedule(
    kind: BetaSchedule = "scaled_linear",
    num_train_steps: int = 1000,
    zero_terminal_snr: bool = False,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> DDPMSchedule:
    """Build a schedule from a beta schedule name; beta_start/end default per kind (unused by cosine)."""
    if num_train_steps < 1:
        raise ValueError(f"num_train_steps must be >= 1, got {num_train_steps}")
    limits = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
    if kind == "linear":
        betas = linear_betas(num_train_steps, **limits)
    elif kind == "scaled_linear":
        betas = scaled_linear_betas(num_train_steps, **limits)
    elif kind == "cosine":
        betas = cosine_betas(num_train_steps)
    else:
        raise ValueError(f"unknown beta schedule {kind!r}; expected 'linear', 'scaled_linear' or 'cosine'")
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return DDPMSchedule(alphas_cumprod=torch.cumprod(1 - betas, dim=0))


def alpha_sigma(schedule: DDPMSchedule, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, sigma)`` per sample, each (B,) float64 on the timesteps' device."""
    acp = schedule.on(timesteps.device)[timesteps.long()]
    return acp.sqrt(), (1 - acp).sqrt()


def snr(schedule: DDPMSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alphas_cumprod / (1 - alphas_cumprod)`` per sample, (B,) float64."""
    acp = schedule.on(timesteps.device)[timesteps.long()]
    return acp / (1 - acp)


def q_sample(
    schedule: DDPMSchedule, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Forward noising ``alpha_i x0 + sigma_i noise``: x0, noise (B, ...), timesteps int (B,)."""
    alpha, sigma = alpha_sigma(schedule, timesteps)
    return expand_like(alpha, x0).to(x0.dtype) * x0 + expand_like(sigma, x0).to(x0.dtype) * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``v = alpha noise - sigma x0``; alpha, sigma (B,)."""
    return expand_like(alpha, x0).to(x0.dtype) * noise - expand_like(sigma, x0).to(x0.dtype) * x0


def ddpm_target(
    schedule: DDPMSchedule,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """Regression target (B, ...) for ``prediction_type``: the noise, or v."""
    if prediction_type == "eps":
        return noise
    if prediction_type == "v":
        return v_target(x0, noise, *alpha_sigma(schedule, timesteps))
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected 'eps' or 'v'")


def x0_eps_from_prediction(
    x_t: torch.Tensor,
    prediction: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: PredictionType,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` estimates (B, ...) from a prediction at noise level alpha, sigma (each (B,)).

    For eps prediction alpha must be > 0: at zero terminal SNR the data is not recoverable from eps
    (Lin et al. 2024 use v prediction for that reason).
    """
    a = expand_like(alpha, x_t).to(x_t.dtype)
    s = expand_like(sigma, x_t).to(x_t.dtype)
    if prediction_type == "eps":
        return (x_t - s * prediction) / a, prediction
    if prediction_type == "v":
        return a * x_t - s * prediction, s * x_t + a * prediction
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected 'eps' or 'v'")


def prediction_to_x0_eps(
    schedule: DDPMSchedule,
    x_t: torch.Tensor,
    prediction: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: PredictionType,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`x0_eps_from_prediction` at integer timesteps (B,)."""
    return x0_eps_from_prediction(x_t, prediction, *alpha_sigma(schedule, timesteps), prediction_type)


def ddpm_time(
    timesteps: torch.Tensor, num_train_steps: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Continuous model time ``t = (i + 1) / N`` in (0, 1] for integer timesteps (B,) -> float (B,).

    ``dtype`` is raised to at least float32 (see :func:`vdm.diffusion.common.time_dtype`).
    """
    return (timesteps.to(torch.float64) + 1).div(num_train_steps).to(time_dtype(dtype))


def ddpm_timesteps_from_time(t: torch.Tensor, num_train_steps: int) -> torch.Tensor:
    """Inverse of :func:`ddpm_time`: ``i = round(t N) - 1`` clamped to [0, N), int64 (B,)."""
    return (t.double() * num_train_steps).round().long().sub(1).clamp(0, num_train_steps - 1)


def sample_ddpm_timesteps(
    batch_size: int,
    num_train_steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training timesteps (B,) int64, uniform over [0, N)."""
    draw_device = generator.device if generator is not None else device
    steps = torch.randint(0, num_train_steps, (batch_size,), generator=generator, device=draw_device)
    return steps.to(device) if device is not None else steps


def ddim_timesteps(
    num_train_steps: int, num_steps: int, spacing: Spacing = "trailing", strength: float = 1.0
) -> torch.Tensor:
    """Decreasing sampling timesteps (S,) int64 with ``S = min(num_steps, M)``, ``M = round(strength N)``.

    Only indices below ``M`` are used, so ``strength < 1`` starts part-way (SDEdit); ``M = 0``
    gives an empty schedule. Spacings (compared in Lin et al. 2024), e.g. N = 1000, S = 10:

    - ``trailing``: ``round(arange(M, 0, -M / S)) - 1`` -> 999, 899, ..., 99. Starts at the last
      index, so with zero terminal SNR sampling starts from pure noise; recommended.
    - ``linspace``: ``round(linspace(0, M - 1, S))`` reversed -> 999, 888, ..., 0.
    - ``leading``: ``arange(S) * (M // S)`` reversed -> 900, 800, ..., 0 (LDM / early diffusers);
      never reaches the last index, so it starts from a noise level that still contains signal.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    m = round(strength * num_train_steps)
    s = min(num_steps, m)
    if s == 0:
        return torch.zeros(0, dtype=torch.long)
    if spacing == "trailing":
        steps = torch.round(torch.arange(m, 0, -m / s, dtype=torch.float64)[:s]) - 1
    elif spacing == "linspace":
        steps = torch.round(torch.linspace(0, m - 1, s, dtype=torch.float64)).flip(0)
    elif spacing == "leading":
        steps = (torch.arange(s, dtype=torch.float64) * (m // s)).flip(0)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected 'trailing', 'linspace' or 'leading'")
    return steps.long()


__all__ = [
    "BetaSchedule",
    "DDPMSchedule",
    "PredictionType",
    "Spacing",
    "alpha_sigma",
    "cosine_betas",
    "ddim_timesteps",
    "ddpm_target",
    "ddpm_time",
    "ddpm_timesteps_from_time",
    "linear_betas",
    "make_ddpm_schedule",
    "prediction_to_x0_eps",
    "q_sample",
    "rescale_zero_terminal_snr",
    "sample_ddpm_timesteps",
    "scaled_linear_betas",
    "snr",
    "v_target",
    "x0_eps_from_prediction",
]
