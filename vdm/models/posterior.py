"""Diagonal Gaussian posterior of the video VAE (fp32 statistics, clamped log-variance)."""

from __future__ import annotations

from typing import Literal

import torch

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z | x) over latents of shape (B, L, T, H, W).

    Statistics are kept in float32 whatever the encoder's dtype, so sampling noise and the KL term
    do not lose precision under bf16 autocast. ``logvar`` is clamped to [-30, 20] so ``exp`` can
    neither underflow to a zero std nor overflow.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(f"mean and logvar shapes differ: {tuple(mean.shape)} vs {tuple(logvar.shape)}")
        self.mean = mean.float()
        self.logvar = logvar.float().clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """Split encoder output (B, 2L, T, H, W) into mean and logvar along channels."""
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample mean + std * eps, (B, L, T, H, W) float32."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """Posterior mode (= mean), (B, L, T, H, W) float32."""
        return self.mean

    def kl(self, reduction: Literal["sum", "mean"] = "sum") -> torch.Tensor:
        """KL(q || N(0, I)) per sample, shape (B,).

        ``"sum"`` sums over L, T, H, W (the ELBO term, grows with clip size); ``"mean"`` averages
        over latent elements (resolution independent, convenient for a fixed loss weight).
        """
        kl = 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)  # B L T H W
        dims = tuple(range(1, kl.ndim))
        if reduction == "sum":
            return kl.sum(dim=dims)
        if reduction == "mean":
            return kl.mean(dim=dims)
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
