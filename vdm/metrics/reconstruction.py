"""Per-frame reconstruction metrics for videos in [-1, 1] (torchmetrics' functional implementations)."""

from __future__ import annotations

import torch
from einops import rearrange
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _frames(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x.float(), "b c t h w -> (b t) c h w")


def mean_frame_baseline(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean-frame prediction of clips (B, C, T, H, W) in [-1, 1] (every frame replaced by its clip's mean
    frame) and which clips move, (B,) bool: some pixel leaves its clip's mean by more than 0.2, i.e. 25 of
    255 levels, far above codec noise, so that predicting the mean frame is no longer nearly right."""
    mean_frame = x.mean(dim=2, keepdim=True).expand_as(x)
    return mean_frame, (x - mean_frame).abs().flatten(1).amax(dim=1) > 0.2


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
