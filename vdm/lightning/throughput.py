"""Training throughput, MFU and data-wait, logged every N steps without syncing the device.

Per window of ``every_n_steps`` optimizer steps: ``perf/samples_per_s``, ``perf/tokens_per_s`` (latent
tokens the model attends over), ``perf/tflops`` (achieved model FLOP/s of the analytic training count:
3 x forward matmul FLOPs, recomputation not counted), ``perf/mfu`` (that over the device peak:
``vdm.utils.perf``), ``perf/data_wait`` (the fraction of the window the loop spent waiting for batches)
and ``perf/step_s``. Everything is host arithmetic on shapes and wall-clock times: no tensor is read, so
the step gains no host-device synchronisation. Over a window the host cannot run more than the launch
queue ahead of the device, so window rates are the device's rates once the first window has passed.

The module says what a batch is worth through ``batch_work(batch) -> (samples, tokens, flops)``; without
it only samples/s (from the batch size) and data-wait are logged. The data wait is measured inside
vdm's loader (time blocked in ``next``); for another loader, the gap between the end of one step and the
start of the next stands in (it then also holds other callbacks' work, such as checkpoint saving).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

from vdm.utils.perf import peak_flops

log = logging.getLogger(__name__)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return 0


class ThroughputMonitor(L.Callback):
    """Logs samples/s, tokens/s, achieved TFLOP/s, MFU and the data-wait fraction (see module docstring).

    Args:
        every_n_steps: window length in training batches (rates are averaged over the window).
        peak_tflops: the MFU denominator in TFLOP/s; None: the GPU's table peak for the trainer's
            precision, or a measured matmul peak on CPU.
        skip_first: steps left out before the first window (compilation, allocator and loader warm-up).
    """

    def __init__(
        self, every_n_steps: int = 50, peak_tflops: float | None = None, skip_first: int = 2
    ) -> None:
        if every_n_steps < 1 or skip_first < 0:
            raise ValueError(f"need every_n_steps >= 1, skip_first >= 0; got {every_n_steps}, {skip_first}")
        self.every_n_steps, self.peak_tflops, self.skip_first = every_n_steps, peak_tflops, skip_first
        self.peak: float | None = None
        self._reset(None)
        self._last_end: float | None = None
        self._last_wait: float | None = None  # the loader's wait counter at ``_last_end``

    def _reset(self, start: float | None) -> None:
        self._window_start, self._steps, self._samples, self._tokens, self._flops = start, 0, 0, 0, 0.0
        self._wait, self._loader_wait_start = 0.0, None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak = peak_flops(pl_module.device, trainer.precision, self.peak_tflops)
        log.info("MFU against a peak of %.3g TFLOP/s", self.peak / 1e12)

    @staticmethod
    def _loader_wait(trainer: L.Trainer) -> float | None:
        loader = getattr(trainer, "train_dataloader", None)
        return getattr(loader, "wait_seconds", None)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        now = time.perf_counter()
        if trainer.global_step < self.skip_first:
            self._last_end = None
            return
        if self._window_start is None:
            # the window opens when the previous step ended, so it holds this step's wait for data
            opened = self._last_end is not None
            self._reset(self._last_end if opened else now)
            self._loader_wait_start = self._last_wait if opened else self._loader_wait(trainer)
        elif self._loader_wait_start is None and self._last_end is not None:
            self._wait += now - self._last_end
        if hasattr(pl_module, "batch_work"):
            samples, tokens, flops = pl_module.batch_work(batch)
        else:
            samples, tokens, flops = _batch_size(batch), 0, 0.0
        self._samples += samples
        self._tokens += tokens
        self._flops += flops

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        self._last_end, self._last_wait = now, self._loader_wait(trainer)
        if self._window_start is None:
            return
        self._steps += 1
        if self._steps < self.every_n_steps:
            return
        metrics = self.window_metrics(now, self._loader_wait(trainer))
        pl_module.log_dict(metrics, rank_zero_only=True)
        self._reset(now)
        self._loader_wait_start = self._last_wait

    def window_metrics(self, now: float, loader_wait: float | None) -> dict[str, float]:
        """The rates of the window that ends at ``now`` (per rank: multiply by the world size for a run)."""
        elapsed = max(now - (self._window_start or now), 1e-9)
        wait = self._wait
        if self._loader_wait_start is not None and loader_wait is not None:
            wait = loader_wait - self._loader_wait_start
        metrics = {
            "perf/samples_per_s": self._samples / elapsed,
            "perf/step_s": elapsed / max(self._steps, 1),
            "perf/data_wait": min(max(wait / elapsed, 0.0), 1.0),
        }
        if self._tokens:
            metrics["perf/tokens_per_s"] = self._tokens / elapsed
        if self._flops:
            metrics["perf/tflops"] = self._flops / elapsed / 1e12
            if self.peak:
                metrics["perf/mfu"] = self._flops / elapsed / self.peak
        return metrics
