"""Tiny seeded Lightning modules and data for the training tests (golden numbers depend on the seeds)."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from vdm.diffusion.objectives import RectifiedFlow
from vdm.lightning.diffusion_module import DiffusionModule
from vdm.lightning.vae_module import VAEModule
from vdm.models.discriminator import PatchDiscriminator3d
from vdm.models.dit import VideoDiT
from vdm.models.text_encoder import TextEncoder
from vdm.models.vae import VideoVAE

VAE_ARGS = {"latent_channels": 4, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
            "temporal_downsample": [True]}


def make_diffusion_module(
    export: Path, text_dir: Path, objective=None, cond_channels: int = 0, fused: bool = False, **kwargs
) -> DiffusionModule:
    """A seeded two-block DiT over the 16-channel latents of ``export``, with the T5 of ``text_dir``."""
    torch.manual_seed(0)
    dit = VideoDiT(
        in_channels=16,
        cond_channels=cond_channels,
        patch_size=(1, 2, 2),
        hidden_size=32,
        depth=2,
        num_heads=2,
        context_dim=64,
    )
    text = TextEncoder(str(text_dir), "t5", max_length=16)
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3, fused=fused)  # noqa: E731
    return DiffusionModule(
        dit, str(export), text, optimizer, objective or RectifiedFlow(), ema_decay=0.9, **kwargs
    )


def latent_batches(bad_step: int) -> list[dict]:
    """Four seeded batches of two (16, 2, 4, 4) latents; at ``bad_step`` the second sample holds a NaN."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for step in range(4):
        latent = torch.randn(2, 16, 2, 4, 4, generator=gen)
        keys = [f"s{step}-{i}" for i in range(2)]
        if step == bad_step:
            latent[1, 0, 0, 0, 0] = float("nan")
            keys = [f"ok-{step}", f"bad-{step}"]
        out.append({"latent": latent, "caption": ["a red ball", "a blue cube"], "key": keys,
                    "meta": [{}, {}]})
    return out


class WeightSnapshots(L.Callback):
    """The DiT's parameters, flattened into one tensor, after every training batch."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights.append(torch.cat([p.detach().flatten().clone() for p in pl_module.dit.parameters()]))


def clips(n: int = 4, seed: int = 0) -> torch.Tensor:
    """(n, 3, 5, 32, 32) smooth moving gradients in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, 5).view(1, 1, 5, 1, 1)
    yy = torch.linspace(-1, 1, 32).view(1, 1, 1, 32, 1)
    xx = torch.linspace(-1, 1, 32).view(1, 1, 1, 1, 32)
    phase = torch.rand(n, 3, 1, 1, 1, generator=g) * 6
    return torch.sin(3 * xx + 2 * yy + phase + 2 * t).clamp(-1, 1)


class ClipData(L.LightningDataModule):
    """The same batch of ``videos`` for ``steps`` training steps and one validation step."""

    def __init__(self, videos: torch.Tensor, steps: int) -> None:
        super().__init__()
        self.videos, self.steps = videos, steps

    def _batches(self, n: int) -> DataLoader:
        meta = [{"pad": False}] * len(self.videos)
        return DataLoader([{"video": self.videos, "meta": meta}] * n, batch_size=None, collate_fn=lambda b: b)

    def train_dataloader(self):
        return self._batches(self.steps)

    def val_dataloader(self):
        return self._batches(1)


def make_vae_module(**kwargs) -> VAEModule:
    """A seeded tiny VAE (``VAE_ARGS``) with a small discriminator; ``kwargs`` override VAEModule's."""
    torch.manual_seed(0)
    defaults = {"discriminator": PatchDiscriminator3d(base_channels=8, num_layers=2, norm_groups=8),
                "disc_optimizer": functools.partial(torch.optim.Adam, lr=1e-3),
                "disc_start_step": 0, "warmup_steps": 0}
    optimizer = functools.partial(torch.optim.Adam, lr=2e-3)
    module = VAEModule(VideoVAE(**VAE_ARGS), optimizer, **{**defaults, **kwargs})
    module.run_config = {"model": {"vae": {"_target_": "vdm.models.vae.VideoVAE", **VAE_ARGS}}}
    return module
