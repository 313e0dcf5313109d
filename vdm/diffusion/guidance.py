"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper that turns a conditional model into a denoiser.

``guided = uncond + scale * (cond - uncond)``; scale 1 is the conditional model, scale 0 the
unconditional one. The conditional and unconditional passes run as one call on a doubled batch
(conditional half first), which is faster than two calls and keeps per-call effects such as
normalisation over the batch identical for both halves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from vdm.diffusion.common import Denoiser

ModelFn = Callable[..., torch.Tensor]
"""``model_fn(x, t, **conditioning) -> prediction`` with x (B, ...) and t float (B,)."""


def _concat_conditioning(
    cond: Mapping[str, torch.Tensor | None], uncond: Mapping[str, torch.Tensor | None]
) -> dict[str, torch.Tensor | None]:
    """Concatenate matching conditioning entries along the batch (cond first); None stays None."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    batched: dict[str, torch.Tensor | None] = {}
    for key, c in cond.items():
        u = uncond[key]
        if c is None and u is None:
            batched[key] = None
        elif isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            if c.shape != u.shape:
                raise ValueError(
                    f"conditioning {key!r} has shape {tuple(c.shape)} for cond but {tuple(u.shape)} for "
                    "uncond; give both the same batch and pad them to one shape (e.g. one text length)"
                )
            batched[key] = torch.cat([c, u])
        else:
            raise TypeError(
                f"conditioning {key!r} must be a tensor (batch first) or None in both cond and uncond, "
                f"got {type(c).__name__} and {type(u).__name__}"
            )
    return batched


def guided_denoiser(
    model_fn: ModelFn,
    cond: Mapping[str, torch.Tensor | None],
    uncond: Mapping[str, torch.Tensor | None],
    scale: float,
) -> Denoiser:
    """Denoiser ``(x, t) -> uncond + scale * (cond - uncond)`` around ``model_fn(x, t, **cond)``.

    ``cond`` / ``uncond`` hold the conditioning keyword arguments: tensors with the batch first
    (B, ...) or None (passed through). With ``scale == 1`` only the conditional pass runs and its
    output is returned unchanged; otherwise one batched call on (2B, ...) computes both. The
    combination is done in at least float32 since the difference of two close bf16 outputs is
    amplified by ``scale``.
    """
    if scale == 1.0:
        cond_kwargs: dict[str, Any] = dict(cond)
        return lambda x, t: model_fn(x, t, **cond_kwargs)
    batched = _concat_conditioning(cond, uncond)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for key, value in batched.items():
            if value is not None and value.shape[0] != 2 * x.shape[0]:
                raise ValueError(f"conditioning {key!r} has batch {value.shape[0] // 2}, x has {x.shape[0]}")
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), **batched)
        dtype = torch.promote_types(out.dtype, torch.float32)
        out_cond, out_uncond = out.to(dtype).chunk(2)
        return (out_uncond + scale * (out_cond - out_uncond)).to(out.dtype)

    return denoise


__all__ = ["ModelFn", "guided_denoiser"]
