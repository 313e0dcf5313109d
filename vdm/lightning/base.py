"""What the two stages' LightningModules share: the run config and the frozen parts in checkpoints, the
length of the learning-rate schedule, validation metrics logged once per epoch, and the checks of the
options both take."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch

from vdm.lightning.nonfinite import NonFinitePolicy, check_policy
from vdm.lightning.schedules import warmup_cosine

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class StageModule(L.LightningModule):
    """Base of ``VAEModule`` and ``DiffusionModule``.

    Subclasses name their frozen submodules in ``frozen`` (weights loaded from their own files: kept out of
    every checkpoint and put back on load), keep their validation ``torchmetrics`` in ``self.val_metrics``
    (logged as ``val/<name>`` at the end of each validation epoch, ``progress_bar`` ones in the bar), and
    build their schedules with :meth:`lr_schedule`.
    """

    #: attribute names of frozen submodules whose weights never enter a checkpoint
    frozen: tuple[str, ...] = ()
    #: validation metrics shown in the progress bar
    progress_bar: tuple[str, ...] = ("loss",)

    def __init__(self, *, warmup_steps: int, min_lr_ratio: float, nonfinite: NonFinitePolicy) -> None:
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"module.warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"module.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        check_policy(nonfinite)
        self.run_config: dict[str, Any] = {}  # the resolved run config, set by the run setup
        self.val_metrics = torch.nn.ModuleDict()
        self._batch_keys: list[str] | None = None  # the keys of the batch a non-finite value came from
        self._work: dict[tuple[int, ...], tuple[int, int]] = {}  # batch_work per batch shape

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: ``trainer.max_steps``, else Lightning's estimate from epochs."""
        trainer = self.trainer
        return int(trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches)

    def lr_schedule(self, optimizer: torch.optim.Optimizer, total_steps: int | None = None) -> dict[str, Any]:
        """Linear warmup then cosine to ``min_lr_ratio`` over ``total_steps`` (default: the run), per step."""
        total = self.total_steps if total_steps is None else total_steps
        scheduler = warmup_cosine(optimizer, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"scheduler": scheduler, "interval": "step"}

    def val_log_name(self, name: str) -> str:
        """The logged name (after ``val/``) of validation metric ``name``."""
        return name

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            if metric.update_called:
                value = metric.compute()  # synced over ranks; NaN when no rank had anything to measure
                if torch.isfinite(value):
                    self.log(f"val/{self.val_log_name(name)}", value, prog_bar=name in self.progress_bar)
            metric.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["vdm_config"] = self.run_config
        state = checkpoint["state_dict"]
        prefixes = tuple(f"{name}." for name in self.frozen)
        for key in [k for k in state if k.startswith(prefixes)] if prefixes else []:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.setdefault("state_dict", {})
        for name in self.frozen:
            module = getattr(self, name, None)
            if module is not None:
                state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
