"""Gradient clipping with a fused optimizer under mixed precision, from the norm the step already has."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import torch

from tests.helpers.modules import WeightSnapshots, latent_batches, make_diffusion_module
from vdm.lightning.strategies import clip_by_norm


def test_clip_by_norm_equals_clip_grad_norm() -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    grads = [torch.randn_like(p) * 10 for p in params]
    expected = [g.clone() for g in grads]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(reference, expected):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(reference, 0.5)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    module = SimpleNamespace(trainer=SimpleNamespace(strategy=object(), precision_plugin=object()))
    clip_by_norm(module, None, params, norm, 0.5)
    for p, r in zip(params, reference):
        assert torch.equal(p.grad, r.grad)
    assert torch.nn.utils.get_total_norm([p.grad for p in params]) <= 0.5 + 1e-6


def test_fused_adamw_clips_under_bf16_mixed(vae_export_dir, text_encoder_dir) -> None:
    # Lightning's own clip_gradients refuses a fused optimizer under any mixed precision
    module = make_diffusion_module(vae_export_dir, text_encoder_dir, fused=True, grad_clip=1e-3)
    snapshots = WeightSnapshots()
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, callbacks=[snapshots],
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(latent_batches(-1), batch_size=None))
    assert trainer.global_step == 2 and trainer.callback_metrics["train/grad_norm"] > 1e-3
    step = snapshots.weights[1] - snapshots.weights[0]
    assert torch.isfinite(step).all() and step.abs().max() > 0
