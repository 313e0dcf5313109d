"""DataLoader of VideoDataset batches whose training position goes into checkpoints and comes back exactly.

In training mode every batch carries its worker's stream snapshot (vdm.data.stream); the loader keeps
the snapshot of the last batch it handed out from each worker, and the number handed out this epoch.
Lightning saves ``state_dict()`` with the loops' state (all ranks' positions gathered, so one
checkpoint holds every rank's stream) and calls ``load_state_dict`` before the first ``iter()`` of a
resumed run: the workers then continue mid-epoch where the checkpointed run was, and the batches are
bit-identical to those of an uninterrupted run.

A position is only meaningful for the stream configuration it was taken with (shards, workers, ranks,
batch size, seed, shuffling, buckets, clip). A resume with a different one fails with a message naming
what changed; ``resume="epoch"`` instead restarts the epoch's stream (the samples already seen in this
epoch are seen again), with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from vdm.data.pipeline import VideoDataset
from vdm.data.shards import dist_info

logger = logging.getLogger(__name__)

RESUME_MODES = ("exact", "epoch")
STATE_VERSION = 1


class DataResumeError(ValueError):
    """A checkpoint's data-stream position cannot be restored with the current data configuration."""


def _identity(batch: Any) -> Any:
    return batch


def stream_config(dataset: VideoDataset, num_workers: int) -> dict[str, Any]:
    """Everything a stream position depends on, keyed by the setting that changes it."""
    names = hashlib.sha1("\n".join(os.path.basename(url) for url in dataset.urls).encode()).hexdigest()
    clip = dataclasses.asdict(dataset.clip) if dataclasses.is_dataclass(dataset.clip) else None
    return {
        "data.train_shards": f"{len(dataset.urls)} shards, names sha1 {names[:12]}",
        "data.num_workers": max(num_workers, 1),
        "world size (trainer.devices x trainer.num_nodes)": dataset.world_size,
        "data.batch_size": dataset.batch_size,
        "data.batches_per_epoch": dataset.batches_per_epoch,
        "data.seed": dataset.seed,
        "data.shuffle_buffer": dataset.shuffle_buffer,
        "data.resampled": dataset.resampled,
        "data.buckets": [bucket.name for bucket in dataset.buckets],
        "data clip (num_frames, frame_stride, target_fps, start, crop, short_policy, image_mode)": clip,
    }


class VideoLoader(DataLoader):
    """DataLoader for a VideoDataset (batches come built): sets the dataset epoch on every ``iter()`` and,
    for a training-mode dataset, saves and restores the exact stream position (see module docstring)."""

    def __init__(
        self,
        dataset: VideoDataset,
        *,
        epoch_fn: Callable[[], int] | None = None,
        resume: Literal["exact", "epoch"] = "exact",
        **kwargs: Any,
    ) -> None:
        if resume not in RESUME_MODES:
            raise ValueError(f"data.resume must be one of {RESUME_MODES}, got {resume!r}")
        kwargs.setdefault("batch_size", None)
        kwargs.setdefault("collate_fn", _identity)
        super().__init__(dataset, **kwargs)
        self.epoch_fn, self.resume = epoch_fn, resume
        self._position: dict[str, Any] | None = None  # of the epoch being iterated
        self._loaded: dict[str, Any] | None = None  # from a checkpoint, for the next iter()
        self.wait_seconds = 0.0  # time the training loop spent waiting for batches (training mode)

    @property
    def _trains(self) -> bool:
        return isinstance(self.dataset, VideoDataset) and self.dataset.mode == "train"

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        dataset = self.dataset
        epoch = self.epoch_fn() if self.epoch_fn is not None else getattr(dataset, "epoch", 0)
        loaded, self._loaded = (self._loaded, None) if self._trains else (None, self._loaded)
        if loaded is not None and loaded["consumed"] >= len(dataset):
            # saved after the last batch of its epoch: Lightning iterates this loader for the next epoch
            epoch, loaded = max(epoch, int(loaded["epoch"]) + 1), None
        if loaded is not None and loaded["epoch"] != epoch:
            loaded = None  # the checkpoint's epoch is over: this one starts afresh
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if not self._trains:
            return super().__iter__()
        consumed = int(loaded["consumed"]) if loaded else 0
        workers = dict(loaded["workers"]) if loaded else {}
        dataset.track_position = True
        offset = consumed % max(self.num_workers, 1)
        dataset.resume = {"epoch": epoch, "offset": offset, "workers": workers} if loaded else None
        self._position = {"epoch": epoch, "consumed": consumed, "workers": workers}
        if loaded:
            logger.info("training data resumes at batch %d of epoch %d", consumed, epoch)
        return self._tracked(super().__iter__(), self._position)

    def _tracked(
        self, batches: Iterator[dict[str, Any]], position: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.wait_seconds += time.perf_counter() - start
            if batch is None:
                return
            worker, snapshot = batch.pop("_stream")
            position["workers"][worker] = snapshot
            position["consumed"] += 1
            yield batch

    # checkpoint state (Lightning calls these for a training dataloader that has them)

    def state_dict(self) -> dict[str, Any]:
        """{"version", "ranks": [position of every rank]}; a collective when several ranks train."""
        if not self._trains:
            return {}
        local = {
            "config": stream_config(self.dataset, self.num_workers),
            **(self._position or {"epoch": self.dataset.epoch, "consumed": 0, "workers": {}}),
        }
        world = self.dataset.world_size or dist_info()[1]
        ranks = [local]
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, local)
        return {"version": STATE_VERSION, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position of this rank for the next ``iter()``; DataResumeError if it cannot be."""
        if not self._trains or not state_dict:
            return
        rank = self.dataset.rank if self.dataset.rank is not None else dist_info()[0]
        ranks = state_dict.get("ranks", [])
        config = stream_config(self.dataset, self.num_workers)
        saved = ranks[rank]["config"] if rank < len(ranks) else {}
        changed = [key for key in config if saved.get(key) != config[key]]
        if len(ranks) != (self.dataset.world_size or 1) or state_dict.get("version") != STATE_VERSION:
            changed.insert(0, f"world size ({len(ranks)} ranks at the checkpoint)")
        if not changed:
            self._loaded = ranks[rank]
            return
        details = "; ".join(f"{k}: {saved.get(k)!r} then, {config.get(k)!r} now" for k in changed)
        message = (
            f"cannot resume the training data stream exactly, its configuration changed since the "
            f"checkpoint: {details}. Resume with the checkpoint's settings, or set data.resume=epoch to "
            "restart this epoch's stream (samples already seen in this epoch are seen again)"
        )
        if self.resume == "exact":
            raise DataResumeError(message)
        logger.warning("%s; data.resume=epoch: restarting the epoch's stream", message)
