"""LightningModule for stage 1: the causal video VAE with reconstruction, KL, perceptual and 3D GAN losses."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from vdm.lightning.base import OptimizerFactory, StageModule
from vdm.lightning.nonfinite import NonFinitePolicy, drop_gradients, handle_nonfinite, is_finite
from vdm.lightning.strategies import (
    clip_by_norm,
    is_deepspeed,
    param_dtype,
    set_deepspeed_gradient_clipping,
)
from vdm.metrics.reconstruction import frame_psnr, frame_ssim, mean_frame_baseline
from vdm.models.discriminator import adaptive_generator_weight, hinge_d_loss, hinge_g_loss
from vdm.utils.seeding import derive_seed

log = logging.getLogger(__name__)

class VAEModule(StageModule):
    """Trains ``vae`` (a ``VideoVAE``, kept as ``self.model``) as in the LDM/VQGAN recipe, extended to video.

    Generator loss: ``l1 * |x - x_hat| + l2 * mse + perceptual * LPIPS + kl * KL + gan * w * hinge_g``,
    every term a per-element (or per-frame) mean, where ``w`` is the adaptive weight (ratio of the
    reconstruction and GAN gradient norms at the decoder's last layer) when ``adaptive_gan_weight``.
    The discriminator (3D PatchGAN, hinge loss) and the GAN term start at ``disc_start_step``.
    Manual optimization: one generator and one discriminator step per batch; ``global_step`` counts
    generator steps (the discriminator's optimizer is stepped directly), so ``max_steps`` means batches.
    Validation: loss with the posterior mode, per-frame PSNR and SSIM, LPIPS when available, and the PSNR
    of the trivial baseline predicting each clip's mean frame. The posterior noise of a training step is
    drawn from a generator seeded by (run seed, step, rank), so a resumed run draws what the uninterrupted
    one did, with no RNG state to save.
    """

    frozen = ("perceptual",)  # the LPIPS network comes from its own files
    progress_bar = ("loss", "psnr")

    def __init__(
        self,
        vae: torch.nn.Module,
        optimizer: OptimizerFactory,
        discriminator: torch.nn.Module | None = None,
        disc_optimizer: OptimizerFactory | None = None,
        perceptual: torch.nn.Module | None = None,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 1.0,
        gan_weight: float = 0.5,
        adaptive_gan_weight: bool = True,
        max_gan_weight: float = 1e4,
        disc_start_step: int = 0,
        grad_clip: float | None = 1.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        sample_posterior: bool = True,
        perceptual_max_frames: int | None = 4,
        num_example_videos: int = 4,
        nonfinite: NonFinitePolicy = "stop",
    ) -> None:
        super().__init__(warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, nonfinite=nonfinite)
        weights = {"l1_weight": l1_weight, "l2_weight": l2_weight, "kl_weight": kl_weight,
                   "perceptual_weight": perceptual_weight, "gan_weight": gan_weight}
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"module.{name} must be >= 0, got {value}")
        if l1_weight + l2_weight <= 0:
            raise ValueError("module: l1_weight + l2_weight must be > 0 (a reconstruction term is required)")
        if (discriminator is None) != (disc_optimizer is None):
            raise ValueError("module: discriminator and disc_optimizer must be given together (or both null)")
        self.save_hyperparameters(
            ignore=["vae", "optimizer", "discriminator", "disc_optimizer", "perceptual"]
        )
        self.automatic_optimization = False
        self.model = vae  # the attribute keeps the checkpoints' "model." keys
        self.discriminator = discriminator
        self.perceptual = perceptual.requires_grad_(False).eval() if perceptual is not None else None
        self.optimizer_factory = optimizer
        self.disc_optimizer_factory = disc_optimizer
        self.val_metrics = torch.nn.ModuleDict(
            {k: MeanMetric() for k in ("loss", "psnr", "ssim", "lpips", "psnr_mean_frame", "psnr_moving",
                                       "psnr_mean_frame_moving")}
        )
        self.val_examples: tuple[torch.Tensor, torch.Tensor] | None = None
        self._base_seed: int | None = None

    @property
    def gan_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.disc_start_step

    def step_generator(self, device: torch.device) -> torch.Generator:
        """The generator of this training step's posterior noise: seeded by (run seed, step, rank)."""
        if self._base_seed is None:
            self._base_seed = torch.initial_seed()  # set by seed_everything(cfg.seed)
        seed = derive_seed(self._base_seed, self.global_step, self.global_rank, "posterior")
        return torch.Generator(device=device).manual_seed(seed)

    def batch_work(self, batch: dict[str, Any]) -> tuple[int, int, int]:
        """(samples, latent positions, training FLOPs of encoder + decoder) of a batch, from shapes only.

        The discriminator and LPIPS are left out: MFU here is the autoencoder's.
        """
        from vdm.models.flops import vae_flops

        b, _, t, h, w = batch["video"].shape
        key = (t, h, w)
        if key not in self._work:
            _, lt, lh, lw = self.model.latent_shape((3, t, h, w))
            self._work[key] = (lt * lh * lw, vae_flops(self.model, t, h, w, training=True))
        positions, flops = self._work[key]
        return int(b), int(b) * positions, int(b) * flops

    def setup(self, stage: str) -> None:
        self._base_seed = torch.initial_seed()
        set_deepspeed_gradient_clipping(self.trainer.strategy, self.hparams.grad_clip)
        if self.discriminator is not None and self.trainer.precision == "16-mixed":
            raise ValueError(
                "trainer.precision=16-mixed: the discriminator step bypasses the fp16 grad scaler; "
                "use bf16-mixed or 32-true for stage 1 with a discriminator"
            )

    def reconstruction_terms(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        """L1, L2 and LPIPS (mean over a subset of frames) of reconstructions; (B, C, T, H, W) in [-1, 1]."""
        terms = {"l1": (x_hat - x).abs().mean(), "l2": F.mse_loss(x_hat, x)}
        if self.perceptual is not None:
            terms["lpips"] = self.perceptual.video_distance(
                x_hat, x, max_frames=self.hparams.perceptual_max_frames
            ).mean()
        hp = self.hparams
        rec = hp.l1_weight * terms["l1"] + hp.l2_weight * terms["l2"]
        terms["rec"] = rec + hp.perceptual_weight * terms.get("lpips", torch.zeros_like(rec))
        return terms

    def generator_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Total generator loss, its logged terms, and the reconstruction (for the discriminator step)."""
        # the model's own dtype: fp32 under autocast, bf16 when DeepSpeed runs the module in bf16
        sample = self.hparams.sample_posterior
        generator = self.step_generator(x.device) if sample else None
        x_hat, posterior = self.model(
            x.to(param_dtype(self.model)), sample_posterior=sample, generator=generator
        )
        x_hat = x_hat.to(x.dtype)
        terms = self.reconstruction_terms(x, x_hat)
        terms["kl"] = posterior.kl(reduction="mean").mean()
        loss = terms["rec"] + self.hparams.kl_weight * terms["kl"]
        if self.gan_active:
            terms["g_loss"] = hinge_g_loss(self.discriminator(x_hat))
            weight = torch.ones((), device=x.device)
            if self.hparams.adaptive_gan_weight:
                weight = adaptive_generator_weight(
                    terms["rec"], terms["g_loss"], self.model.last_decoder_layer, self.hparams.max_gan_weight
                )
            terms["gan_weight"] = weight
            loss = loss + self.hparams.gan_weight * weight * terms["g_loss"]
        terms["loss"] = loss
        return loss, terms, x_hat

    def _step(self, optimizer: Any, loss: torch.Tensor, raw: bool = False) -> torch.Tensor | None:
        """Backward, clip and step; returns the gradient norm before clipping (None if not known)."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
        if norm is not None and not is_finite(norm):  # all-reduced under DDP: the same on every rank
            handle_nonfinite(self.hparams.nonfinite, "gradient", self.global_step, self._batch_keys)
            drop_gradients(params)  # the step below then changes nothing, but still counts
            (optimizer.optimizer if raw else optimizer).step()
            return None
        if self.hparams.grad_clip:
            clip_by_norm(self, optimizer, params, norm, self.hparams.grad_clip)
        # the raw optimizer step leaves global_step counting generator steps only
        (optimizer.optimizer if raw else optimizer).step()
        if norm is None and is_deepspeed(self.trainer.strategy):  # gradients live in DeepSpeed's buffers
            engine_norm = self.trainer.strategy.deepspeed_engine.get_global_grad_norm()
            norm = torch.as_tensor(float(engine_norm)) if engine_norm is not None else None
        return norm

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["video"]
        optimizers = self.optimizers()
        opt_g, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        schedulers = self.lr_schedulers()
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        gan_active = self.gan_active

        loss, terms, x_hat = self.generator_loss(x)
        self._batch_keys = batch.get("key")
        if self.hparams.nonfinite == "stop" and not is_finite(loss.detach()):
            handle_nonfinite("stop", "generator loss", self.global_step, self._batch_keys)
        grad_norm = self._step(opt_g, loss)
        if grad_norm is not None:
            self.log("train/grad_norm", grad_norm)
        if gan_active:
            logits_real = self.discriminator(x.detach())
            logits_fake = self.discriminator(x_hat.detach())
            terms["d_loss"] = hinge_d_loss(logits_real, logits_fake)
            terms["logits_real"], terms["logits_fake"] = logits_real.mean(), logits_fake.mean()
            d_norm = self._step(opt_d, terms["d_loss"], raw=True)
            if d_norm is not None:
                terms["d_grad_norm"] = d_norm
        schedulers[0].step()
        if gan_active and len(schedulers) > 1:  # the discriminator's schedule starts with its first step
            schedulers[1].step()

        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items() if k not in ("loss", "rec")})
        self.log("train/lr", opt_g.param_groups[0]["lr"])
        return loss.detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor] | None:
        """Updates the validation metrics; returns ``{"x", "x_hat"}`` for callbacks (reconstruction FVD)."""
        # duplicates that only even out the number of batches per rank are not evaluated
        keep = [not meta.get("pad", False) for meta in batch["meta"]]
        if not any(keep):
            return None
        x = batch["video"][torch.tensor(keep, device=batch["video"].device)]
        x_hat, posterior = self.model(x.to(param_dtype(self.model)), sample_posterior=False)
        x_hat = x_hat.to(x.dtype)  # metrics in the data's precision also under bf16 autocast
        terms = self.reconstruction_terms(x, x_hat)
        loss = terms["rec"] + self.hparams.kl_weight * posterior.kl(reduction="mean").mean()
        metrics = self.val_metrics
        metrics["loss"].update(loss, weight=x.shape[0])
        metrics["psnr"].update(frame_psnr(x_hat, x))
        metrics["ssim"].update(frame_ssim(x_hat, x))
        mean_frame, moving = mean_frame_baseline(x)
        metrics["psnr_mean_frame"].update(frame_psnr(mean_frame, x))
        # the clips that move; weight 0 keeps every rank's metric in step when a batch has none
        for name, prediction in (("psnr_moving", x_hat), ("psnr_mean_frame_moving", mean_frame)):
            if moving.any():
                metrics[name].update(frame_psnr(prediction[moving], x[moving]))
            else:
                metrics[name].update(x.new_zeros(()), weight=0.0)
        if "lpips" in terms:
            metrics["lpips"].update(terms["lpips"], weight=x.shape[0])
        if batch_idx == 0:
            n = self.hparams.num_example_videos
            self.val_examples = (x[:n].detach().cpu(), x_hat[:n].detach().clamp(-1, 1).cpu())
        return {"x": x.detach(), "x_hat": x_hat.detach().clamp(-1, 1)}

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[dict[str, Any]]]:
        optimizers = [self.optimizer_factory(self.model.parameters())]
        if self.discriminator is not None:
            optimizers.append(self.disc_optimizer_factory(self.discriminator.parameters()))
        # the discriminator runs (and warms up) from disc_start_step on
        lengths = [self.total_steps, max(self.total_steps - self.hparams.disc_start_step, 1)]
        return optimizers, [self.lr_schedule(opt, length) for opt, length in zip(optimizers, lengths)]
