"""The random parts of a stage-2 training step, drawn per sample so that they are reproducible anywhere.

Each sample gets its own CPU generator seeded by (run seed, sample key, salt); its noise, time, caption
drop and image-conditioning draws then depend on what it is and when it is seen, not on its rank,
position or batch: a run on N ranks draws what one process with the same global batch draws, and a
resumed run draws what the uninterrupted one did, with no RNG state to restore.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vdm.diffusion.common import Generators, randn
from vdm.diffusion.objectives import DiffusionObjective
from vdm.utils.devices import to_device_nonblocking
from vdm.utils.seeding import keyed_seed


def sample_generators(keys: Sequence[Any] | None, base: int, salt: str) -> list[torch.Generator] | None:
    """One CPU generator per sample key, seeded by (``base``, key, ``salt``); None without keys."""
    if not keys:
        return None
    return [torch.Generator().manual_seed(keyed_seed(base, str(k), salt)) for k in keys]


def training_draws(
    objective: DiffusionObjective,
    shape: Sequence[int],
    num_tokens: int,
    generator: Generators | None,
    *,
    caption_dropout: float,
    i2v_probability: float,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Noise of ``shape`` (B, C, T, H, W), times, caption drops and image-conditioning flags for B samples.

    With one generator per sample, each sample's draws come from its own generator only. Drawn on the
    CPU and copied to ``device`` without blocking the host; ``drop_host`` stays on the CPU, so deciding
    which captions to drop reads no device tensor.
    """
    b = shape[0]
    if generator is None or isinstance(generator, torch.Generator):
        noise = torch.randn(tuple(shape), generator=generator, device="cpu")
        t = objective.sample_time(b, num_tokens, generator=generator)
        u = torch.rand(2, b, generator=generator)
    else:
        noise = randn(shape, generator, "cpu")
        t = torch.cat([objective.sample_time(1, num_tokens, generator=g) for g in generator])
        u = torch.stack([torch.rand(2, generator=g) for g in generator], dim=1)
    drop = u[0] < caption_dropout
    return {
        "noise": to_device_nonblocking(noise, device),
        "t": to_device_nonblocking(t, device),
        "drop": to_device_nonblocking(drop, device),
        "drop_host": drop,
        "use_image": to_device_nonblocking(u[1] < i2v_probability, device),
    }
