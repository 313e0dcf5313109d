"""Exponential moving average of model weights, on top of ``torch.optim.swa_utils.AveragedModel``.

After the ``n``-th update (``n`` = 1, 2, ...), every floating-point parameter and buffer moves as
``ema <- d_n * ema + (1 - d_n) * param`` with the warmed-up decay
``d_n = min(decay ** every, (1 + n) / (warmup + n))`` (the schedule of the LDM/Stable Diffusion
``LitEma``; ``warmup = 0`` gives a constant decay). Updating only every ``every`` optimizer steps
raises the decay to ``decay ** every``, so the averaging horizon stays ``~1 / (1 - decay)`` optimizer
steps whatever the interval. The first update copies the weights (AveragedModel's convention).

The average lives in an ``nn.Module`` (``AveragedModel.module``), so it is saved and restored with the
LightningModule's state dict, and sampling uses it like the model itself.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

Gather = Callable[[list[nn.Parameter]], AbstractContextManager]
#: elements of sharded parameters made whole at once during an update (see ``EMA.update``)
GATHER_NUMEL = 50_000_000


def _full_numel(t: torch.Tensor) -> int:
    """Elements of a tensor, or of the whole parameter a ZeRO-3 shard belongs to (``ds_numel``)."""
    return int(getattr(t, "ds_numel", t.numel()))


def _groups(sizes: list[int], limit: int = GATHER_NUMEL) -> Iterator[tuple[int, int]]:
    """Consecutive index ranges whose sizes sum to at most ``limit`` (a larger single tensor alone)."""
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            yield start, i
            start, total = i, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def ema_decay(num_updates: int, decay: float, warmup: int, every: int = 1) -> float:
    """Decay of update number ``n`` (1-based): ``min(decay ** every, (1 + n) / (warmup + n))``."""
    target = decay**every
    if warmup <= 0:
        return target
    return min(target, (1.0 + num_updates) / (warmup + num_updates))


class EMA(nn.Module):
    """EMA copy of ``model``: call ``update(model, step)`` after each optimizer step.

    Args:
        model: the trained module (deep-copied at construction; the copy is frozen).
        decay: per-optimizer-step decay in [0, 1).
        warmup: ``d_n <= (1 + n) / (warmup + n)``, so early averages forget the random init fast.
        every: update on optimizer steps that are multiples of ``every`` (the decay is compensated).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: int = 10, every: int = 1) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every < 1 or warmup < 0:
            raise ValueError(f"EMA needs every >= 1 and warmup >= 0, got every={every}, warmup={warmup}")
        self.decay, self.warmup, self.every = decay, warmup, every
        self.averaged = AveragedModel(
            copy.deepcopy(model), multi_avg_fn=self._multi_avg, use_buffers=True
        ).requires_grad_(False)
        self.averaged.module.train(model.training)
        self._count: int | None = None  # n_averaged on the host: the decay never reads the device

    @property
    def module(self) -> nn.Module:
        """The averaged model (same class and config as the trained one)."""
        return self.averaged.module

    @property
    def num_updates(self) -> int:
        """Updates averaged in so far (read from the device once, then counted on the host)."""
        if self._count is None:
            self._count = int(self.averaged.n_averaged.item())
        return self._count

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None  # n_averaged was replaced

    def _multi_avg(
        self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor
    ) -> None:
        # num_averaged counts earlier updates: this one is update n = num_averaged + 1; the first copies
        n = self.num_updates + 1
        weight = 1.0 if n == 1 else 1.0 - ema_decay(n, self.decay, self.warmup, self.every)
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c.to(a.dtype) for a, c in floats], weight)
        for a, c in zip(averaged, current):  # integer buffers (counters) are copied
            if not a.is_floating_point():
                a.copy_(c)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, gather: Gather | None = None) -> bool:
        """Average ``model`` in when ``step`` (optimizer steps done, >= 1) is a multiple of ``every``.

        ``gather(params)`` is a context manager that makes sharded parameters whole while the average
        reads them (DeepSpeed ZeRO-3: ``deepspeed.zero.GatheredParameters``); it is entered for groups of
        at most ``GATHER_NUMEL`` elements, so a sharded model is never materialised at once.
        """
        if step % self.every != 0:
            return False
        count = self.num_updates
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if len(mine) != len(theirs):
            raise ValueError(f"EMA of a model with {len(mine)} tensors updated from one with {len(theirs)}")
        for start, stop in _groups([t.numel() if gather is None else _full_numel(t) for t in mine]):
            params = [t for t in theirs[start:stop] if isinstance(t, nn.Parameter)]
            with gather(params) if gather is not None else contextlib.nullcontext():
                self._multi_avg(mine[start:stop], [t.detach() for t in theirs[start:stop]],
                                self.averaged.n_averaged)
        self.averaged.n_averaged += 1
        self._count = count + 1
        return True

    def train(self, mode: bool = True) -> EMA:
        """The average never trains (no dropout); ``train()`` on a parent leaves it in eval mode."""
        return super().train(False)
