"""The pixel convention: inside vdm a video is float in [-1, 1]; on disk (and in loaders) uint8 0..255.
Every conversion between the two goes through here, so rounding is the same everywhere."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] (values outside are clipped) -> uint8 0..255, rounded to nearest; layout kept."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def uint8_to_float(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1]; into ``out`` (same shape, float32) when given."""
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {x.dtype}")
    if out is None:
        out = x.to(torch.float32)
    else:
        out.copy_(x)
    return out.div_(127.5).sub_(1.0)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round float pixels in [-1, 1] to the 8-bit values a saved video holds, still float in [-1, 1]."""
    return uint8_to_float(to_uint8(x))


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] -> (T, H, W, C) uint8 (what video encoders and image files take)."""
    return to_uint8(video).permute(1, 2, 3, 0).cpu().numpy()


def from_uint8_frames(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (C, T, H, W) float in [-1, 1] (the inverse of ``to_uint8_frames``)."""
    return uint8_to_float(torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2))
