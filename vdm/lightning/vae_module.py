"""LightningModule for stage 1: reconstruction + KL training of the causal video VAE."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import grad_norm
from torchmetrics import MeanMetric
from torchmetrics.functional.image import peak_signal_noise_ratio

from vdm.lightning.schedules import warmup_cosine

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def frame_psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of every frame for videos in [-1, 1]: (B, C, T, H, W) x2 -> (B * T,)."""
    pred = x_hat.clamp(-1, 1).transpose(1, 2).flatten(0, 1).float()  # (B*T, C, H, W)
    target = x.transpose(1, 2).flatten(0, 1).float()
    return peak_signal_noise_ratio(pred, target, data_range=2.0, reduction="none", dim=(1, 2, 3))


def kl_per_element(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over every latent element."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


class VAEModule(L.LightningModule):
    """Trains ``model`` (a ``VideoVAE``) with weighted L1 (+ L2) reconstruction and a KL term.

    Both terms are per-element means, so ``kl_weight`` is relative to a per-pixel reconstruction error.
    Validation reports the loss with the posterior mode, per-frame PSNR, and the PSNR of the trivial
    baseline that predicts each clip's mean frame (a model must clearly beat it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerFactory,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        kl_weight: float = 1e-6,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        sample_posterior: bool = True,
    ) -> None:
        super().__init__()
        if l1_weight < 0 or l2_weight < 0 or kl_weight < 0 or l1_weight + l2_weight <= 0:
            raise ValueError(
                f"module: loss weights must be >= 0 with l1_weight + l2_weight > 0, got "
                f"l1={l1_weight}, l2={l2_weight}, kl={kl_weight}"
            )
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"module.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.model = model
        self.optimizer_factory = optimizer
        self.run_config: dict[str, Any] = {}  # the resolved run config, set by the entry point
        self.val_psnr = MeanMetric()
        self.val_psnr_baseline = MeanMetric()
        self.val_loss = MeanMetric()

    def losses(self, x: torch.Tensor, sample_posterior: bool) -> dict[str, torch.Tensor]:
        """Loss terms for clips ``x`` (B, C, T, H, W) in [-1, 1]."""
        x_hat, posterior = self.model(x, sample_posterior=sample_posterior)
        l1 = (x_hat - x).abs().mean()
        l2 = F.mse_loss(x_hat, x)
        kl = kl_per_element(posterior.mean, posterior.logvar)
        hp = self.hparams
        loss = hp.l1_weight * l1 + hp.l2_weight * l2 + hp.kl_weight * kl
        return {"loss": loss, "l1": l1, "l2": l2, "kl": kl, "x_hat": x_hat}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.losses(batch["video"], self.hparams.sample_posterior)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": out[k] for k in ("l1", "l2", "kl")})
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # duplicates that only even out the number of batches per rank are not evaluated
        keep = [not meta.get("pad", False) for meta in batch["meta"]]
        if not any(keep):
            return
        x = batch["video"][torch.tensor(keep, device=batch["video"].device)]
        out = self.losses(x, sample_posterior=False)
        baseline = x.mean(dim=2, keepdim=True).expand_as(x)  # each clip's mean frame
        self.val_loss.update(out["loss"], weight=x.shape[0])
        self.val_psnr.update(frame_psnr(out["x_hat"], x))
        self.val_psnr_baseline.update(frame_psnr(baseline, x))

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=False)
        self.log("val/psnr", self.val_psnr.compute(), prog_bar=True)
        self.log("val/psnr_mean_frame", self.val_psnr_baseline.compute())
        for metric in (self.val_loss, self.val_psnr, self.val_psnr_baseline):
            metric.reset()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = grad_norm(self.model, norm_type=2)
        if norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.model.parameters())
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        scheduler = warmup_cosine(optimizer, self.hparams.warmup_steps, int(total), self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vdm_config"] = self.run_config
