"""Callbacks: data skip counts, reconstruction videos, and the stage-1 VAE export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from vdm.data.encode import EncodeOptions, encode_frames
from vdm.utils.vae_export import compute_latent_stats, export_vae


class DataSkipMonitor(L.Callback):
    """Logs how many samples the data pipeline skipped (corrupt, undecodable, too short) and the rate.

    Keys: ``data/train_skipped``, ``data/train_skip_rate`` (and ``val`` likewise), summed over workers.
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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if (trainer.global_step + 1) % self.every_n_steps == 0:
            self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")


def _to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) in [-1, 1] -> (T, H, W, C) uint8."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


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
            frames = _to_uint8_frames(torch.cat([x, x_hat], dim=-1))  # original | reconstruction
            path = self.dirpath / f"step{step:07d}_{i}.mp4"
            path.write_bytes(encode_frames(frames, self.fps, EncodeOptions(keyframe_interval=8, crf=18)))
            paths.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log(
                    {"val/videos": [wandb.Video(str(p), format="mp4") for p in paths], "trainer/global_step": step}
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
            stats = compute_latent_stats(lambda x: model.encode(x).mode(), self._videos(trainer, pl_module),
                                         self.num_clips)
        finally:
            model.train(was_training)
        config = getattr(pl_module, "run_config", {}).get("model")
        if not config:
            raise ValueError("VAEExportCallback: the module carries no run_config['model'] to export")
        vae_hash = export_vae(model, config, stats, self.dirpath)
        for logger in trainer.loggers:
            logger.log_hyperparams({"vae_hash": vae_hash})
        return vae_hash
