"""LightningModule for stage 2: a latent video DiT trained in a frozen stage-1 VAE's latent space."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import MeanMetric

from vdm.diffusion.common import Generators
from vdm.diffusion.objectives import DiffusionObjective
from vdm.lightning.base import OptimizerFactory, StageModule
from vdm.lightning.diffusion_draws import sample_generators, training_draws
from vdm.lightning.diffusion_sampling import LatentVideoSampler, image_condition
from vdm.lightning.ema import EMA
from vdm.lightning.nonfinite import NonFinitePolicy, drop_gradients, handle_nonfinite, is_finite
from vdm.lightning.strategies import (
    clip_by_norm,
    compile_blocks,
    is_deepspeed,
    param_dtype,
    set_deepspeed_gradient_clipping,
)
from vdm.models.dit import check_fits
from vdm.models.flops import dit_flops
from vdm.models.text_encoder import TextEncoder
from vdm.utils.vae_export import load_vae_export

log = logging.getLogger(__name__)

class DiffusionModule(StageModule):
    """Trains ``dit`` (a ``VideoDiT``) with ``objective`` on normalised latents of the VAE export.

    Latents: clips are encoded on the fly with the frozen VAE (posterior mean), or come precomputed
    (``batch["latent"]``, raw posterior means from ``data_prep/precompute_latents.py``); both are then
    normalised per channel with the export's statistics, ``(z - mean) / std``. Text: captions go
    through the frozen ``text_encoder`` (or precomputed ``batch["text"]``, ``batch["text_mask"]``);
    each sample's caption is replaced by the empty caption with probability ``caption_dropout`` (the
    unconditional branch of classifier-free guidance). Image-to-video: with ``dit.cond_channels ==
    C + 1`` the DiT also sees ``image_condition`` (first-frame latent + mask) for a fraction
    ``i2v_probability`` of the samples (zeros otherwise, i.e. text-to-video). An EMA of the DiT
    weights is kept, checkpointed, and used for sampling.
    """

    frozen = ("vae",)  # weights come from the VAE export, whose hash the checkpoint records

    def __init__(
        self,
        dit: torch.nn.Module,
        vae_export: str,
        text_encoder: TextEncoder,
        optimizer: OptimizerFactory,
        objective: DiffusionObjective,
        caption_dropout: float = 0.1,
        i2v_probability: float = 0.0,
        ema_decay: float = 0.9999,
        ema_warmup: int = 10,
        ema_every: int = 1,
        grad_clip: float | None = 1.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        expected_vae_hash: str | None = None,
        compile_blocks: bool = False,
        nonfinite: NonFinitePolicy = "stop",
        val_t_bands: int = 4,
    ) -> None:
        super().__init__(warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, nonfinite=nonfinite)
        if val_t_bands < 1:
            raise ValueError(f"module.val_t_bands must be >= 1, got {val_t_bands}")
        if not 0.0 <= caption_dropout <= 1.0 or not 0.0 <= i2v_probability <= 1.0:
            raise ValueError(
                f"module.caption_dropout and module.i2v_probability must be in [0, 1], "
                f"got {caption_dropout}, {i2v_probability}"
            )
        self.save_hyperparameters(ignore=["dit", "text_encoder", "optimizer", "objective"])
        export = load_vae_export(vae_export, expected_vae_hash)
        self.vae_hash = export.vae_hash
        channels = export.model.latent_channels
        _check_compatible(dit, channels, text_encoder.hidden_size, i2v_probability)
        self.dit = dit
        self.vae = export.model  # frozen; weights come from the export, not from checkpoints
        self.text_encoder = text_encoder
        self.objective = objective
        self.optimizer_factory = optimizer
        self.ema = EMA(dit, ema_decay, ema_warmup, ema_every)
        stats = export.stats
        self.register_buffer("latent_mean", torch.tensor(stats.mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latent_std", torch.tensor(stats.std).view(1, -1, 1, 1, 1), persistent=False)
        # validation loss in val_t_bands equal bands of t: val/loss_t0.00-0.25 ... val/loss_t0.75-1.00
        self.t_band_edges = torch.linspace(0.0, 1.0, val_t_bands + 1, dtype=torch.float64)
        edges = self.t_band_edges.tolist()
        self.t_band_names = [f"loss_band{i}" for i in range(val_t_bands)]  # module keys cannot hold dots
        self.val_log_names = {
            f"loss_band{i}": f"loss_t{lo:.2f}-{hi:.2f}" for i, (lo, hi) in enumerate(zip(edges, edges[1:]))
        }
        names = ("loss", "loss_ema", *self.t_band_names)
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in names})
        self._loss: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        """Under DeepSpeed the EMA leaves the module tree; precomputed text embeddings must come from this
        run's text encoder."""
        set_deepspeed_gradient_clipping(self.trainer.strategy, self.hparams.grad_clip)
        if self.hparams.compile_blocks and stage == "fit":
            compile_blocks(self.dit)
        if is_deepspeed(self.trainer.strategy) and "ema" in self._modules:
            # DeepSpeed casts the whole module to bf16 and ZeRO-3 shards it: the average must stay a whole
            # fp32 copy on every rank, so it is kept outside and checkpointed in the client state
            object.__setattr__(self, "ema", self._modules.pop("ema"))
        datamodule = getattr(self.trainer, "datamodule", None)
        read = getattr(datamodule, "read_latent_info", None)
        if read is None:
            return
        made_by = read().get("text_encoder")
        if made_by is not None and made_by != self.text_encoder.identifier:
            raise ValueError(
                f"the latent corpus holds text embeddings of text encoder {made_by}, but this run uses "
                f"{self.text_encoder.identifier} (from {self.text_encoder.path}); re-run precompute_latents "
                "with this encoder, or without --text-encoder"
            )

    @property
    def image_to_video(self) -> bool:
        return getattr(self.dit, "cond_channels", 0) > 0

    # latents and text

    @torch.no_grad()
    def normalized_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, C, T, H, W) latents with zero mean, unit std per channel (over the export's statistics)."""
        if "latent" in batch:
            return (batch["latent"].float() - self.latent_mean) / self.latent_std
        return self.encode_latents(batch["video"])

    @torch.no_grad()
    def encode_latents(self, videos: torch.Tensor) -> torch.Tensor:
        """Normalised latents (posterior mean) of videos (B, 3, T, H, W) in [-1, 1], on the device."""
        z = self.vae.encode(videos.to(self.device, param_dtype(self.vae))).mode()
        return (z.float() - self.latent_mean) / self.latent_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std + self.latent_mean

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Videos (B, 3, T, H, W) in [-1, 1] of normalised latents (the inverse of ``encode_latents``)."""
        return self.vae.decode(self.denormalize(z).to(param_dtype(self.vae))).float().clamp(-1, 1)

    @torch.no_grad()
    def text_context(
        self, batch: dict[str, Any], drop: torch.Tensor, drop_host: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, L, D), mask (B, L)); samples with ``drop`` (B,) True get the empty caption.
        ``drop_host``: the same flags on the CPU, read instead of the device tensor (no sync)."""
        drop_host = drop.cpu() if drop_host is None else drop_host
        if "text" in batch:
            context, mask = batch["text"].float(), batch["text_mask"].bool()
            if drop_host.any():
                null, null_mask = self.text_encoder.null_embedding()
                context = torch.where(drop.view(-1, 1, 1), null.to(context), context)
                mask = torch.where(drop.view(-1, 1), null_mask.to(mask), mask)
            return context, mask
        captions = ["" if d else c for c, d in zip(batch["caption"], drop_host.tolist())]
        return self.text_encoder.encode(captions)

    # objective

    def diffusion_loss(
        self,
        z: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        use_image: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
        reduce: bool = True,
    ) -> torch.Tensor:
        """Mean objective loss of ``model`` (default: the DiT) at noise ``noise`` and times ``t`` (B,); the
        per-sample losses (B,) when not ``reduce``."""
        model = self.dit if model is None else model
        x_t = self.objective.add_noise(z, noise, t)
        if self.image_to_video:
            use = (
                torch.zeros(z.shape[0], dtype=torch.bool, device=z.device) if use_image is None else use_image
            )
            x_t = torch.cat([x_t, image_condition(z, use).to(x_t)], dim=1)
        dtype = param_dtype(model)  # fp32 params (autocast does the rest), or bf16 ones under DeepSpeed
        prediction = model(x_t.to(dtype), t, context.to(dtype), mask)
        losses = self.objective.loss(prediction.float(), z, noise, t)
        return losses.mean() if reduce else losses

    def draw(self, z: torch.Tensor, generator: Generators | None = None) -> dict[str, torch.Tensor]:
        """The random parts of one training step (``vdm.lightning.diffusion_draws.training_draws``)."""
        return training_draws(
            self.objective,
            z.shape,
            self.num_tokens(z.shape[2:]),
            generator,
            caption_dropout=self.hparams.caption_dropout,
            i2v_probability=self.hparams.i2v_probability,
            device=z.device,
        )

    def sample_generators(self, batch: dict[str, Any], salt: str) -> list[torch.Generator] | None:
        """One generator per sample, seeded by (run seed, sample key, ``salt``); None without sample keys."""
        # the run seed, set by seed_everything(cfg.seed): the same on every rank
        return sample_generators(batch.get("key"), torch.initial_seed(), salt)

    def batch_work(self, batch: dict[str, Any]) -> tuple[int, int, int]:
        """(samples, DiT tokens, training FLOPs of the DiT) of a batch, from shapes only (no sync).

        FLOPs: ``vdm.models.flops.dit_flops`` of a training step over the batch; the frozen VAE encode and
        text encoder are not model FLOPs of this stage. Cross-attention counts the padded text length
        (real lengths would need the mask's values).
        """
        if "latent" in batch:
            b, *_, t, h, w = batch["latent"].shape
        else:
            b, _, t, h, w = self.vae.latent_shape(batch["video"].shape)
        length = int(batch["text"].shape[1]) if "text" in batch else int(self.text_encoder.max_length)
        key = (t, h, w, length)
        if key not in self._work:
            flops = dit_flops(self.dit, (t, h, w), length, training=True)
            self._work[key] = (self.dit.num_tokens((t, h, w)), flops)
        tokens, flops = self._work[key]
        return int(b), int(b) * tokens, int(b) * flops

    def num_tokens(self, latent_thw: Sequence[int]) -> int:
        return self.dit.num_tokens(latent_thw)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        z = self.normalized_latents(batch)
        rnd = self.draw(z, self.sample_generators(batch, f"train/{self.global_step}"))
        context, mask = self.text_context(batch, rnd["drop"], rnd["drop_host"])
        loss = self.diffusion_loss(z, context, mask, rnd["noise"], rnd["t"], rnd["use_image"])
        self._batch_keys = batch.get("key")
        self._loss = loss.detach()  # checked with the gradients after the backward: one sync per step
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The step's one host sync: loss and gradient norm finite, checked after the backward was queued,
        so the device only waits for the optimizer's launch."""
        loss, self._grad_norm = getattr(self, "_loss", None), None
        if is_deepspeed(self.trainer.strategy):  # p.grad is not this step's gradient: the engine's norm later
            if loss is not None and not is_finite(loss):  # no skipping inside the engine: the run stops
                handle_nonfinite("stop", "loss", self.global_step, self._batch_keys)
            return
        params = [p for p in self.dit.parameters() if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # the all-reduced norm is the same on every rank, so all take the same decision (a rank's NaN loss
        # reaches it through its gradients); one process also looks at the loss itself
        single = loss is not None and self.trainer.world_size == 1
        checked = torch.stack([norm.float(), loss.float().to(norm.device)]) if single else norm
        if not is_finite(checked):
            what = "loss" if single and not is_finite(loss) else "gradient"
            handle_nonfinite(self.hparams.nonfinite, what, self.global_step, self._batch_keys)
            drop_gradients(params)
            return
        self._grad_norm = norm
        self.log("train/grad_norm", norm)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any
    ) -> None:
        if self.hparams.grad_clip:
            params = [p for p in self.dit.parameters() if p.grad is not None]
            clip_by_norm(self, optimizer, params, getattr(self, "_grad_norm", None), self.hparams.grad_clip)

    @property
    def ema_detached(self) -> bool:
        """True once ``setup`` has taken the EMA out of the module tree (DeepSpeed)."""
        return "ema" not in self._modules

    def _ema_on_device(self) -> None:
        if self.ema_detached and self.ema.averaged.n_averaged.device != self.device:
            self.ema.to(self.device)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if is_deepspeed(self.trainer.strategy):  # gradients live in DeepSpeed's buffers: its own norm
            norm = self.trainer.strategy.deepspeed_engine.get_global_grad_norm()
            if norm is not None:  # a tensor stays on the device (no sync); older DeepSpeed gives a float
                self.log("train/grad_norm", norm if isinstance(norm, torch.Tensor) else float(norm))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then its EMA update.

        Not in ``on_train_batch_end``: Lightning calls callbacks' ``on_train_batch_end`` (where
        ``ModelCheckpoint(every_n_train_steps)`` saves) before the module's, so a checkpoint would miss that
        step's update and a resumed run's EMA would drift from the uninterrupted run's. This hook runs once
        per optimizer step; under DeepSpeed once per micro-batch, and the engine says whether it stepped.
        """
        super().optimizer_step(*args, **kwargs)
        engine = self.trainer.model
        if callable(getattr(engine, "was_step_applied", None)) and not engine.was_step_applied():
            return
        self._ema_on_device()
        gather = None
        if any(hasattr(p, "ds_id") for p in self.dit.parameters()):  # ZeRO-3 shards: gathered per group
            import deepspeed

            gather = deepspeed.zero.GatheredParameters
        # global_step counts this optimizer step only once the hook has returned
        self.ema.update(self.dit, self.global_step + 1, gather=gather)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        keep = [not meta.get("pad", False) for meta in batch["meta"]]
        if not any(keep):
            return
        self._ema_on_device()
        z = self.normalized_latents(batch)
        # the same noise, times and (no) caption drops for every evaluation: comparable across steps
        generator = self.sample_generators(batch, "val") or torch.Generator().manual_seed(10_000 + batch_idx)
        rnd = self.draw(z, generator)
        drop = torch.zeros_like(rnd["drop"])
        context, mask = self.text_context(batch, drop, torch.zeros_like(rnd["drop_host"]))
        rows = torch.tensor(keep, device=z.device)
        t = rnd["t"][rows]
        args = (z[rows], context[rows], mask[rows], rnd["noise"][rows], t)
        losses = self.diffusion_loss(*args, reduce=False)
        self.val_metrics["loss"].update(losses.mean(), weight=int(rows.sum()))
        self.val_metrics["loss_ema"].update(
            self.diffusion_loss(*args, model=self.ema.module), weight=int(rows.sum())
        )
        # the loss per band of diffusion time: which noise levels the model has learned
        band = torch.bucketize(t.float(), self.t_band_edges.to(t.device)[1:-1], right=True)
        for i, name in enumerate(self.t_band_names):
            selected = band == i
            # every band is updated on every rank (weight 0 when empty), so the metric syncs stay in step
            value = losses[selected].mean() if selected.any() else losses.new_zeros(())
            self.val_metrics[name].update(value, weight=int(selected.sum()))

    def val_log_name(self, name: str) -> str:
        return self.val_log_names.get(name, name)

    # sampling

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        num_frames: int,
        height: int,
        width: int,
        *,
        num_steps: int = 50,
        guidance_scale: float = 5.0,
        seed: int | Sequence[int] = 0,
        image: torch.Tensor | None = None,
        init_video: torch.Tensor | None = None,
        strength: float = 1.0,
        use_ema: bool = True,
    ) -> torch.Tensor:
        """Videos (B, 3, num_frames, height, width) in [-1, 1] for ``prompts`` (seeded).

        ``seed`` is one seed for the whole batch, or one per prompt: then every video's noise comes from
        its own generator, so a video is the same whichever batch it is sampled in.

        ``image`` (B, 3, H, W) in [-1, 1] conditions on a first frame (needs an image-to-video DiT);
        ``init_video`` (B, 3, T, H, W) with ``strength`` < 1 starts from that video noised (SDEdit).
        See :class:`vdm.lightning.diffusion_sampling.LatentVideoSampler`.
        """
        self._ema_on_device()
        return self.sampler(use_ema).sample(
            prompts,
            (num_frames, height, width),
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            image=image,
            init_video=init_video,
            strength=strength,
        )

    def sampler(self, use_ema: bool = True) -> LatentVideoSampler:
        """The sampler of this module's DiT (or its EMA), VAE, text encoder and objective."""
        return LatentVideoSampler(
            model=self.ema.module if use_ema else self.dit,
            text_encoder=self.text_encoder,
            objective=self.objective,
            encode=self.encode_latents,
            decode=self.decode_latents,
            latent_shape=self.vae.latent_shape,
            num_tokens=self.num_tokens,
            device=self.device,
            image_to_video=self.image_to_video,
        )

    # optimisation and checkpoints

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.dit.parameters())
        return {"optimizer": optimizer, "lr_scheduler": self.lr_schedule(optimizer)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vae_hash"] = self.vae_hash
        if self.ema_detached:  # DeepSpeed saves the client state, not state_dict: the EMA goes there
            checkpoint["ema_state_dict"] = {
                f"ema.{k}": v.detach().cpu() for k, v in self.ema.state_dict().items()
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("vae_hash")
        if saved is not None and saved != self.vae_hash:
            raise ValueError(
                f"checkpoint was trained on VAE {saved[:12]} but model.vae_export has VAE "
                f"{self.vae_hash[:12]}"
            )
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        state.update(checkpoint.pop("ema_state_dict", {}))
        if self.ema_detached:  # the EMA is not in the module's state dict: load it here
            ema = {k.removeprefix("ema."): state.pop(k) for k in [k for k in state if k.startswith("ema.")]}
            if ema:
                self.ema.load_state_dict(ema, strict=True)


def _check_compatible(dit: torch.nn.Module, channels: int, text_dim: int, i2v_probability: float) -> None:
    """The DiT must match the VAE's latent channels and the text encoder's width."""
    try:
        check_fits(getattr(dit, "in_channels", channels), getattr(dit, "cond_channels", 0),
                   getattr(dit, "context_dim", text_dim), latent_channels=channels, text_dim=text_dim,
                   image_conditioning=i2v_probability > 0)
    except ValueError as err:
        raise ValueError(f"model.dit.{err}") from None
