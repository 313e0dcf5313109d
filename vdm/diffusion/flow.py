"""Rectified flow: interpolation, velocity target, training-time sampling and sampling schedules.

Conventions (relied on by the training module and the samplers):

- Path: ``x_t = (1 - t) * x0 + t * noise`` with ``t`` in [0, 1]; ``t = 0`` is data, ``t = 1`` is
  pure Gaussian noise (Liu et al. 2023, "Flow Straight and Fast"; Esser et al. 2024, SD3).
- The model predicts the velocity ``v = noise - x0 = dx_t/dt``; sampling integrates
  ``dx/dt = v(x, t)`` from t = 1 down to t = 0.
- Tensors are (B, ...) (latent videos ``B C T H W``); times are float (B,).
- Timestep shift (SD3, Sec. 5.3.2): ``t' = s t / (1 + (s - 1) t)``. ``s > 1`` moves time towards the
  noisy end, which larger inputs need: more tokens average away more noise, so the same ``t`` is
  effectively less noisy at higher resolution / longer clips.
"""

from __future__ import annotations

import math
from typing import Literal, TypeVar

import torch

from vdm.diffusion.common import expand_like, rand, randn, time_dtype

TimeSampling = Literal["logit_normal", "uniform"]
T = TypeVar("T", float, torch.Tensor)


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t noise``: x0, noise (B, ...), t (B,) in [0, 1] -> (B, ...) in x0's dtype."""
    t_b = expand_like(t, x0).to(x0.dtype)
    return (1 - t_b) * x0 + t_b * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity regression target ``v = noise - x0`` (B, ...)."""
    return noise - x0


def flow_velocity_to_x0(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Data estimate ``x0 = x_t - t v`` from a velocity prediction; t (B,)."""
    return x_t - expand_like(t, x_t).to(x_t.dtype) * v


def flow_velocity_to_noise(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise estimate ``noise = x_t + (1 - t) v`` from a velocity prediction; t (B,)."""
    return x_t + (1 - expand_like(t, x_t).to(x_t.dtype)) * v


def flow_snr(t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``((1 - t) / t)^2`` of the flow path; +inf at t = 0, 0 at t = 1."""
    return ((1 - t) / t) ** 2


def shift_timesteps(t: T, shift: float) -> T:
    """SD3 timestep shift ``s t / (1 + (s - 1) t)`` (identity for s = 1; keeps 0 and 1 fixed).

    Equivalent to multiplying the noise-to-signal ratio ``t / (1 - t)`` by ``s``.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def shift_for_num_tokens(num_tokens: int, base_num_tokens: int = 256, base_shift: float = 1.0) -> float:
    """Resolution- and length-aware shift ``base_shift * sqrt(num_tokens / base_num_tokens)``.

    SD3 (Esser et al. 2024, Sec. 5.3.2): to keep the per-token uncertainty of an input with ``m``
    tokens equal to that of the reference with ``n`` tokens, the noise-to-signal ratio is scaled by
    ``sqrt(m / n)``. The default reference is 256 tokens at shift 1 (SD3's 256^2 images: 32^2
    latents in 2x2 patches). The square root grows gently with clip length, unlike Flux's log-shift
    that is linear in the token count and so extrapolates exponentially for long videos.

    ``num_tokens`` counts the transformer's tokens (``VideoDiT.num_tokens``).
    """
    if num_tokens < 1 or base_num_tokens < 1:
        raise ValueError(f"token counts must be >= 1, got {num_tokens} and {base_num_tokens}")
    return base_shift * math.sqrt(num_tokens / base_num_tokens)


def sample_flow_time(
    batch_size: int,
    method: TimeSampling = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times (B,) float32 in [0, 1] (then shifted by ``shift``).

    ``logit_normal``: ``t = sigmoid(N(mean, std^2))`` (SD3, Sec. 3.1: more weight on intermediate
    times, which are hardest); ``uniform``: U[0, 1). ``mean``/``std`` are ignored for ``uniform``.
    """
    if method == "logit_normal":
        t = torch.sigmoid(mean + std * randn((batch_size,), generator, device))
    elif method == "uniform":
        t = rand((batch_size,), generator, device)
    else:
        raise ValueError(f"unknown flow time sampling {method!r}; expected 'logit_normal' or 'uniform'")
    return shift_timesteps(t, shift) if shift != 1.0 else t


def flow_timesteps(
    num_steps: int,
    shift: float = 1.0,
    strength: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sampling schedule (num_steps + 1,) decreasing from ``shift(strength)`` to exactly 0.

    Uniform in the unshifted time ``u`` (``u = strength ... 0``), then shifted. ``strength = 1``
    starts from pure noise (t = 1); a smaller strength starts part-way (SDEdit) and still takes
    ``num_steps`` steps over the shorter interval.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    u = torch.linspace(strength, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_timesteps(u, shift).to(device=device, dtype=time_dtype(dtype))


__all__ = [
    "TimeSampling",
    "flow_interpolate",
    "flow_snr",
    "flow_target",
    "flow_timesteps",
    "flow_velocity_to_noise",
    "flow_velocity_to_x0",
    "sample_flow_time",
    "shift_for_num_tokens",
    "shift_timesteps",
]
