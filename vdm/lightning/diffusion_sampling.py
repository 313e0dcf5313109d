"""Sampling videos from a latent DiT: noise, text guidance, first-frame and SDEdit starts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vdm.diffusion.common import randn
from vdm.diffusion.guidance import guided_denoiser
from vdm.diffusion.objectives import DiffusionObjective
from vdm.lightning.strategies import param_dtype
from vdm.models.text_encoder import TextEncoder


def image_condition(z: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """First-frame conditioning channels for image-to-video: (B, C + 1, T, H, W).

    Channels ``:C`` hold the first latent frame of the samples with ``use`` (B,) True (zeros elsewhere
    and at later frames); the last channel is the mask, 1 at frame 0 of those samples.
    """
    b, _, t, h, w = z.shape
    cond = torch.zeros(b, z.shape[1] + 1, t, h, w, dtype=z.dtype, device=z.device)
    keep = use.to(z.dtype).view(b, 1, 1, 1)
    cond[:, :-1, 0] = z[:, :, 0] * keep
    cond[:, -1, 0] = keep[:, 0]
    return cond


def seed_generators(seed: int | Sequence[int], batch: int) -> torch.Generator | list[torch.Generator]:
    """One CPU generator for the batch (an int seed), or one per sample (a sequence of ``batch`` seeds)."""
    if isinstance(seed, int):
        return torch.Generator().manual_seed(seed)
    if len(seed) != batch:
        raise ValueError(f"sample: {len(seed)} seeds for {batch} prompts")
    return [torch.Generator().manual_seed(int(s)) for s in seed]


@dataclass(frozen=True)
class LatentVideoSampler:
    """Draws videos from a latent DiT with text guidance, first-frame and SDEdit starts.

    Everything it uses is named here (``DiffusionModule.sampler`` builds one), so the same code serves
    the training callbacks and ``evaluate.py``.

    Args:
        model: the denoiser (the DiT or its EMA copy), called as ``model(x, t, context, context_mask)``.
        text_encoder: captions -> (context, mask); its ``null_embedding`` is the unconditional branch.
        objective: the training objective, whose ``sample`` integrates from noise (or a noised start).
        encode: videos (B, 3, T, H, W) in [-1, 1] -> normalised latents on ``device``.
        decode: normalised latents -> videos (B, 3, T, H, W) in [-1, 1].
        latent_shape: (B, 3, T, H, W) of a video -> (B, C, T', H', W') of its latent.
        num_tokens: DiT tokens of a latent (T', H', W') (the objective's resolution-aware shift reads it).
        device: where sampling runs.
        image_to_video: the DiT takes first-frame conditioning channels.
    """

    model: torch.nn.Module
    text_encoder: TextEncoder
    objective: DiffusionObjective
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    latent_shape: Callable[[Sequence[int]], tuple[int, ...]]
    num_tokens: Callable[[Sequence[int]], int]
    device: torch.device
    image_to_video: bool = False

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        shape: tuple[int, int, int],
        *,
        num_steps: int,
        guidance_scale: float,
        seed: int | Sequence[int],
        image: torch.Tensor | None = None,
        init_video: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """Videos (B, 3, T, H, W) in [-1, 1] for ``prompts``; ``shape`` = (T, H, W) in pixels.

        Arguments as in ``DiffusionModule.sample``; classifier-free guidance is one batched call per step.
        """
        model, device, b = self.model, self.device, len(prompts)
        dtype = param_dtype(model)
        latent_shape = self.latent_shape((b, 3, *shape))
        generator = seed_generators(seed, b)
        noise = randn(latent_shape, generator, device)
        context, mask = self.text_encoder.encode(list(prompts))
        null, null_mask = self.text_encoder.null_embedding()
        cond = {"context": context.to(device), "context_mask": mask.to(device)}
        uncond = {
            "context": null.to(device).expand(b, -1, -1),
            "context_mask": null_mask.to(device).expand(b, -1),
        }
        extra: torch.Tensor | None = None
        if image is not None or self.image_to_video:
            if not self.image_to_video:
                raise ValueError("sample(image=...): this DiT has no image conditioning (cond_channels=0)")
            first = torch.zeros(latent_shape, device=device)
            if image is not None:
                first[:, :, :1] = self.encode(image.unsqueeze(2))
            extra = image_condition(first, torch.full((b,), image is not None, device=device))

        def model_fn(
            x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
        ) -> torch.Tensor:
            if extra is not None:
                x = torch.cat([x, extra.repeat(x.shape[0] // b, 1, 1, 1, 1).to(x)], dim=1)
            return model(x.to(dtype), t, context.to(dtype), context_mask).float()

        init = self.encode(init_video) if init_video is not None else None
        denoiser = guided_denoiser(model_fn, cond, uncond, guidance_scale)
        z = self.objective.sample(
            denoiser, noise, num_steps, self.num_tokens(latent_shape[2:]), init=init, strength=strength,
            generator=generator,
        )
        return self.decode(z)
