"""Training objectives as small configurable objects: what the Lightning module delegates to.

An objective turns clean latents ``x0`` into a noised model input, scores the model's prediction
and samples. Both speak the model's continuous time ``t`` in [0, 1] (1 = noise), so one DiT
timestep embedder and one training step serve rectified flow and DDPM alike:

- ``sample_time(batch, num_tokens)`` -> t (B,), ``add_noise(x0, noise, t)`` -> x_t,
- ``loss(prediction, x0, noise, t)`` -> per-sample loss (B,),
- ``sample(denoiser, noise, num_steps, num_tokens, init=, strength=, generator=)`` -> x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from vdm.diffusion.common import Denoiser, Generators
from vdm.diffusion.ddpm import (
    DDPMSchedule,
    PredictionType,
    Spacing,
    ddpm_time,
    ddpm_timesteps_from_time,
    make_ddpm_schedule,
    q_sample,
    sample_ddpm_timesteps,
)
from vdm.diffusion.flow import flow_interpolate, sample_flow_time, shift_for_num_tokens
from vdm.diffusion.losses import ddpm_loss, flow_loss
from vdm.diffusion.samplers import ddim_sample, euler_sample, heun_sample


class DiffusionObjective(Protocol):
    def sample_time(
        self, batch_size: int, num_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def loss(
        self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor: ...

    def sample(
        self,
        denoiser: Denoiser,
        noise: torch.Tensor,
        num_steps: int,
        num_tokens: int,
        *,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
        generator: Generators | None = None,
    ) -> torch.Tensor: ...


@dataclass
class RectifiedFlow:
    """Rectified flow with a velocity target (``vdm.diffusion.flow``).

    ``shift`` None makes the timestep shift resolution- and length-aware,
    ``sqrt(num_tokens / base_num_tokens)`` (SD3), for training and sampling alike.
    """

    time_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    time_mean: float = 0.0
    time_std: float = 1.0
    shift: float | None = None
    base_num_tokens: int = 256
    weighting: str = "none"
    sampler: Literal["euler", "heun"] = "euler"

    def __post_init__(self) -> None:
        if self.sampler not in ("euler", "heun"):
            raise ValueError(f"objective.sampler must be 'euler' or 'heun', got {self.sampler!r}")
        if self.shift is not None and self.shift <= 0:
            raise ValueError(f"objective.shift must be > 0 or null, got {self.shift}")

    def time_shift(self, num_tokens: int) -> float:
        return (
            self.shift if self.shift is not None else shift_for_num_tokens(num_tokens, self.base_num_tokens)
        )

    def sample_time(
        self, batch_size: int, num_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return sample_flow_time(
            batch_size,
            self.time_sampling,
            self.time_mean,
            self.time_std,
            self.time_shift(num_tokens),
            generator=generator,
        )

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return flow_interpolate(x0, noise, t)

    def loss(
        self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return flow_loss(prediction, x0, noise, t, weighting=self.weighting)  # type: ignore[arg-type]

    def sample(
        self,
        denoiser: Denoiser,
        noise: torch.Tensor,
        num_steps: int,
        num_tokens: int,
        *,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
        generator: Generators | None = None,
    ) -> torch.Tensor:
        sampler = euler_sample if self.sampler == "euler" else heun_sample
        return sampler(denoiser, noise, num_steps, self.time_shift(num_tokens), init=init, strength=strength)


@dataclass
class DDPM:
    """Discrete DDPM (``vdm.diffusion.ddpm``) with eps or v prediction, sampled with DDIM(eta)."""

    num_train_steps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    zero_terminal_snr: bool = True
    prediction_type: PredictionType = "v"
    weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = 5.0
    eta: float = 0.0
    spacing: Spacing = "trailing"

    def __post_init__(self) -> None:
        if self.prediction_type == "eps" and self.zero_terminal_snr:
            raise ValueError(
                "objective: eps prediction is undefined at zero terminal SNR (x_T holds no signal to "
                "recover x0 from); use prediction_type=v or zero_terminal_snr=false"
            )
        self.schedule: DDPMSchedule = make_ddpm_schedule(
            self.beta_schedule, self.num_train_steps, self.zero_terminal_snr
        )

    def timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return ddpm_timesteps_from_time(t, self.num_train_steps).to(t.device)

    def sample_time(
        self, batch_size: int, num_tokens: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return ddpm_time(
            sample_ddpm_timesteps(batch_size, self.num_train_steps, generator), self.num_train_steps
        )

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return q_sample(self.schedule, x0, noise, self.timesteps(t))

    def loss(
        self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return ddpm_loss(
            prediction,
            self.schedule,
            x0,
            noise,
            self.timesteps(t),
            self.prediction_type,
            weighting=self.weighting,
            gamma=self.min_snr_gamma,
        )

    def sample(
        self,
        denoiser: Denoiser,
        noise: torch.Tensor,
        num_steps: int,
        num_tokens: int,
        *,
        init: torch.Tensor | None = None,
        strength: float = 1.0,
        generator: Generators | None = None,
    ) -> torch.Tensor:
        return ddim_sample(
            denoiser,
            self.schedule,
            noise,
            num_steps,
            prediction_type=self.prediction_type,
            eta=self.eta,
            spacing=self.spacing,
            init=init,
            strength=strength,
            generator=generator,
        )
