"""Per-sample diffusion losses and loss weightings.

Every loss here returns a (B,) tensor in float32 (or float64 for float64 inputs): the mean squared
error over all non-batch dimensions, times a per-sample weight. Reduction over the batch (mean,
masking, gradient accumulation) is the caller's choice.

Weightings:

- ``none``: weight 1.
- ``min_snr`` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"):
  the loss expressed on x0 is weighted by ``min(SNR, gamma)``. On the model's own target that is
  ``min(SNR, gamma) / SNR`` for eps prediction and ``min(SNR, gamma) / (SNR + 1)`` for v
  prediction (VP schedules). For rectified flow (velocity ``noise - x0``, ``x0 = x_t - t v``) the
  same x0-space weighting becomes ``t^2 min(SNR, gamma) = min((1 - t)^2, gamma t^2)`` with the flow
  SNR ``((1 - t) / t)^2``: the same x0-space weighting as the DDPM eps / v forms. Its largest value
  is ``(sqrt(gamma) / (1 + sqrt(gamma)))^2`` (0.48 for gamma = 5), so it also scales the loss down
  relative to ``none``; mind that when the loss is combined with other terms.
- ``cosmap`` (flow only; Esser et al. 2024, Sec. 3.1): ``2 / (pi (1 - 2t + 2t^2))``, the
  CosMap timestep density used as a weight: training with uniform t and this weight has the same
  expected loss as sampling t from CosMap.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from vdm.diffusion.ddpm import DDPMSchedule, PredictionType, ddpm_target, snr
from vdm.diffusion.flow import flow_target

DDPMWeighting = Literal["none", "min_snr"]
FlowWeighting = Literal["none", "min_snr", "cosmap"]


def weighted_mse(
    prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample ``weight * mean((prediction - target)^2)`` over non-batch dims -> (B,).

    Computed in at least float32 so bf16 predictions under autocast do not lose the small errors.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    dtype = torch.promote_types(torch.promote_types(prediction.dtype, target.dtype), torch.float32)
    err = (prediction.to(dtype) - target.to(dtype)).square()
    loss = err.reshape(err.shape[0], -1).mean(dim=1)
    return loss if weight is None else loss * weight.to(device=loss.device, dtype=dtype)


def min_snr_weight(snr_values: torch.Tensor, gamma: float, prediction_type: PredictionType) -> torch.Tensor:
    """Min-SNR-gamma weight (B,) on the eps or v loss for per-sample SNRs (B,).

    eps: ``min(SNR, gamma) / SNR`` (1 at SNR = 0, its limit); v: ``min(SNR, gamma) / (SNR + 1)``.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "eps":
        safe = snr_values.clamp(min=torch.finfo(snr_values.dtype).tiny)  # avoid 0/0 in the unused branch
        return torch.where(snr_values > 0, clipped / safe, 1.0)
    if prediction_type == "v":
        return clipped / (snr_values + 1)
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected 'eps' or 'v'")


def ddpm_loss_weight(
    schedule: DDPMSchedule,
    timesteps: torch.Tensor,
    prediction_type: PredictionType,
    weighting: DDPMWeighting = "none",
    gamma: float = 5.0,
) -> torch.Tensor:
    """Per-sample weights (B,) float32 for integer timesteps (B,)."""
    if weighting == "none":
        return torch.ones(timesteps.shape[0], device=timesteps.device)
    if weighting == "min_snr":
        return min_snr_weight(snr(schedule, timesteps), gamma, prediction_type).float()
    raise ValueError(f"unknown DDPM loss weighting {weighting!r}; expected 'none' or 'min_snr'")


def flow_loss_weight(t: torch.Tensor, weighting: FlowWeighting = "none", gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weights (B,) for flow times t (B,) in [0, 1]; see the module docstring."""
    if weighting == "none":
        return torch.ones_like(t)
    if weighting == "min_snr":
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        # t^2 min(((1-t)/t)^2, gamma) written without the division, finite at t = 0
        return torch.minimum((1 - t) ** 2, gamma * t**2)
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    raise ValueError(f"unknown flow loss weighting {weighting!r}; expected 'none', 'min_snr' or 'cosmap'")


def flow_loss(
    prediction: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    weighting: FlowWeighting = "none",
    gamma: float = 5.0,
) -> torch.Tensor:
    """Weighted velocity MSE (B,) of a prediction at ``flow_interpolate(x0, noise, t)``."""
    return weighted_mse(prediction, flow_target(x0, noise), flow_loss_weight(t, weighting, gamma))


def ddpm_loss(
    prediction: torch.Tensor,
    schedule: DDPMSchedule,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: PredictionType,
    weighting: DDPMWeighting = "none",
    gamma: float = 5.0,
) -> torch.Tensor:
    """Weighted eps / v MSE (B,) of a prediction at ``q_sample(schedule, x0, noise, timesteps)``."""
    target = ddpm_target(schedule, x0, noise, timesteps, prediction_type)
    weight = ddpm_loss_weight(schedule, timesteps, prediction_type, weighting, gamma)
    return weighted_mse(prediction, target, weight)


__all__ = [
    "DDPMWeighting",
    "FlowWeighting",
    "ddpm_loss",
    "ddpm_loss_weight",
    "flow_loss",
    "flow_loss_weight",
    "min_snr_weight",
    "weighted_mse",
]
