"""Per-frame reconstruction metrics for videos in [-1, 1] (torchmetrics' functional implementations)."""

from __future__ import annotations

import torch
from einops import rearrange
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _frames(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x.float(), "b c t h w -> (b t) c h w")


def frame_psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of every frame, data range 2 ([-1, 1]): (B, C, T, H, W) x2 -> (B * T,)."""
    return peak_signal_noise_ratio(
        _frames(x_hat.clamp(-1, 1)), _frames(x), data_range=2.0, reduction="none", dim=(1, 2, 3)
    )


def frame_ssim(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SSIM of every frame (Gaussian window 11, sigma 1.5, data range 2): (B, C, T, H, W) x2 -> (B * T,)."""
    return structural_similarity_index_measure(
        _frames(x_hat.clamp(-1, 1)), _frames(x), data_range=2.0, reduction="none"
    )
