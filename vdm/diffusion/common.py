"""Helpers shared by the diffusion functions: per-sample broadcasting, seeded noise, the denoiser type.

Tensors carry a leading batch dimension and any trailing shape (latent videos are ``B C T H W``).
Per-sample scalars have shape (B,) and are broadcast with :func:`expand_like`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoiser(x, t) -> prediction``: ``x`` (B, ...), ``t`` float (B,) in [0, 1]; output shaped like x."""

Generators = torch.Generator | Sequence[torch.Generator]
"""One generator for the whole batch, or one per sample (row ``i`` drawn from ``generators[i]``)."""


def expand_like(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View per-sample values (B,) as (B, 1, ..., 1) with ``x.ndim`` dims, on x's device.

    The dtype is kept, so float64 schedule values promote the arithmetic they enter; callers cast
    where they want x's dtype.
    """
    if values.ndim != 1 or values.shape[0] != x.shape[0]:
        raise ValueError(f"expected per-sample values of shape ({x.shape[0]},), got {tuple(values.shape)}")
    return values.to(x.device).view(-1, *([1] * (x.ndim - 1)))


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype for continuous times next to data of ``dtype``: never below float32.

    Half-precision times would quantise t coarsely (bf16 has 8 bits of mantissa), so bf16/fp16 data
    gets float32 times while float64 data keeps float64.
    """
    return torch.promote_types(dtype, torch.float32)


def full_time(t: float, x: torch.Tensor) -> torch.Tensor:
    """The time ``t`` repeated per sample: (B,) on x's device in :func:`time_dtype` of x."""
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=time_dtype(x.dtype))


def randn(
    shape: Sequence[int],
    generator: Generators | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise drawn from ``generator`` (global RNG when None), returned on ``device``.

    The draw happens on the generator's own device and is then moved, so a CPU generator gives the
    same numbers whether the result lives on CPU or GPU. With one generator per sample, row ``i`` is
    drawn from ``generator[i]`` alone: a sample's noise does not depend on the rest of its batch.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        generators = list(generator)
        if len(generators) != shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generators])
    draw_device = generator.device if generator is not None else device
    noise = torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype)
    return noise.to(device) if device is not None else noise


def rand(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform [0, 1) noise drawn from ``generator`` (global RNG when None), returned on ``device``."""
    draw_device = generator.device if generator is not None else device
    values = torch.rand(tuple(shape), generator=generator, device=draw_device, dtype=dtype)
    return values.to(device) if device is not None else values


__all__ = ["Denoiser", "expand_like", "full_time", "rand", "randn", "time_dtype"]
