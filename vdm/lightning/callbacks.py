"""Callbacks that report on the data stream."""

from __future__ import annotations

from typing import Any

import lightning as L


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
