"""Callbacks: data skip counts, reconstruction videos, the stage-1 VAE export, and stage-2 samples."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from vdm.data.encode import encode_frames
from vdm.eval.generation import ENCODE_OPTIONS
from vdm.eval.prompts import select_prompts
from vdm.lightning.strategies import param_dtype
from vdm.utils.frames import to_uint8_frames
from vdm.utils.vae_export import compute_latent_stats, export_vae


class DataSkipMonitor(L.Callback):
    """Logs how many samples the data pipeline skipped (corrupt, undecodable, too short) and the rate.

    Keys: ``data/train_skipped``, ``data/train_skip_rate`` and ``data/train_skipped_<reason>`` (the
    exception class, or ``shard`` for an unreadable shard; ``val`` likewise), summed over workers.
    The pipeline itself aborts above ``data.max_skip_rate``; this makes the trend visible before that.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        summary = getattr(trainer.datamodule, "skip_summary", None)
        if summary is None:
            return
        stats: dict[str, Any] = summary().get(split, {})
        if stats.get("seen"):
            pl_module.log(f"data/{split}_skipped", float(stats["skipped"]), rank_zero_only=True)
            pl_module.log(f"data/{split}_skip_rate", float(stats["rate"]), rank_zero_only=True)
            for reason, count in stats.get("reasons", {}).items():
                pl_module.log(f"data/{split}_skipped_{reason}", float(count), rank_zero_only=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if (trainer.global_step + 1) % self.every_n_steps == 0:
            self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")


class ReconstructionVideos(L.Callback):
    """Writes side-by-side ``original | reconstruction`` mp4s of the first validation batch.

    Files go to ``dirpath/step<N>_<i>.mp4``; with a wandb logger they are also logged as ``val/videos``
    (from the encoded file, so no moviepy is needed). Reads ``pl_module.val_examples`` = (x, x_hat).
    """

    def __init__(self, dirpath: str, every_n_steps: int = 500, fps: float = 8.0) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.fps = fps
        self._last_step = -1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        examples = getattr(pl_module, "val_examples", None)
        step = trainer.global_step
        if trainer.sanity_checking or examples is None or not trainer.is_global_zero:
            return
        if self._last_step >= 0 and step - self._last_step < self.every_n_steps:
            return
        self._last_step = step
        self.dirpath.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (x, x_hat) in enumerate(zip(*examples)):
            frames = to_uint8_frames(torch.cat([x, x_hat], dim=-1))  # original | reconstruction
            path = self.dirpath / f"step{step:07d}_{i}.mp4"
            path.write_bytes(encode_frames(frames, self.fps, ENCODE_OPTIONS))
            paths.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log(
                    {
                        "val/videos": [wandb.Video(str(p), format="mp4") for p in paths],
                        "trainer/global_step": step,
                    }
                )


class VAEExportCallback(L.Callback):
    """At the end of fit: latent statistics over ``num_clips`` training clips, then the stage-1 export.

    Runs on global rank zero with the plain model (no collectives); other ranks wait at a barrier.
    """

    def __init__(self, dirpath: str, num_clips: int = 256) -> None:
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        self.dirpath = dirpath
        self.num_clips = num_clips

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.fast_dev_run:
            self.export(trainer, pl_module)
        trainer.strategy.barrier("vae_export")

    def _videos(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[torch.Tensor]:
        datamodule = trainer.datamodule
        for batch in datamodule.train_dataloader():
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            batch = datamodule.on_after_batch_transfer(batch, 0)
            yield batch["video"]

    def export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            dtype = param_dtype(model)
            stats = compute_latent_stats(
                lambda x: model.encode(x.to(dtype)).mode(), self._videos(trainer, pl_module), self.num_clips
            )
        finally:
            model.train(was_training)
        config = (getattr(pl_module, "run_config", {}).get("model") or {}).get("vae")
        if not config:
            raise ValueError("VAEExportCallback: the module carries no run_config['model']['vae'] to export")
        vae_hash = export_vae(model, config, stats, self.dirpath)
        for logger in trainer.loggers:
            logger.log_hyperparams({"vae_hash": vae_hash})
        return vae_hash


class DiffusionSamples(L.Callback):
    """Every ``every_n_steps`` training steps (and at the end of fit), samples videos for held-out prompts
    with the EMA weights and classifier-free guidance, writes ``dirpath/step<N>_<i>.mp4`` (with the
    prompts in ``step<N>.txt``) and logs them to wandb as ``samples/videos``. Seeded: the same noise
    at every step, so the videos show training progress only. Runs on global rank zero.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 500,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        num_prompts: int = 4,
        num_frames: int = 17,
        height: int = 256,
        width: int = 256,
        num_steps: int = 50,
        guidance_scale: float = 5.0,
        seed: int = 0,
        fps: float = 8.0,
    ) -> None:
        if every_n_steps < 1 or num_prompts < 1 or num_steps < 1:
            raise ValueError(
                f"every_n_steps, num_prompts and num_steps must be >= 1, got {every_n_steps}, {num_prompts}, "
                f"{num_steps}"
            )
        self.dirpath, self.every_n_steps = Path(dirpath), every_n_steps
        self.prompts = select_prompts(prompts, prompts_file, num_prompts)
        self.shape = (num_frames, height, width)
        self.num_steps, self.guidance_scale, self.seed, self.fps = num_steps, guidance_scale, seed, fps
        self.written: list[Path] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = any(p.name.startswith(f"step{trainer.global_step:07d}_") for p in self.written)
        if not trainer.fast_dev_run and not done:
            self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        if not trainer.is_global_zero:
            return []
        step = trainer.global_step
        frames, height, width = self.shape
        videos = pl_module.sample(
            self.prompts,
            frames,
            height,
            width,
            num_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
        )
        self.dirpath.mkdir(parents=True, exist_ok=True)
        prompts_file = self.dirpath / f"step{step:07d}.txt"
        prompts_file.write_text("".join(p + "\n" for p in self.prompts), encoding="utf-8")
        paths = []
        for i, video in enumerate(videos):
            path = self.dirpath / f"step{step:07d}_{i}.mp4"
            path.write_bytes(encode_frames(to_uint8_frames(video), self.fps, ENCODE_OPTIONS))
            paths.append(path)
        self.written += paths
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                videos = [wandb.Video(str(p), caption=c, format="mp4") for p, c in zip(paths, self.prompts)]
                logger.experiment.log({"samples/videos": videos, "trainer/global_step": step})
        return paths
