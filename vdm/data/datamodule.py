"""LightningDataModule over vdm-shards corpora: training batches in training mode, validation in exact mode.

Training: every rank yields exactly ``batches_per_epoch`` batches per epoch (derived from the manifest
when None: train samples // (world_size * batch_size), at least 1). Validation: every sample once
across ranks and workers, with flagged duplicates (``meta["pad"]``) so all ranks run the same number
of steps; ``val_batches`` caps it per rank. See vdm.data.pipeline for both modes.

The epoch for shuffling/seeding comes from the trainer (``trainer.current_epoch``) when attached, else
from ``set_epoch`` / ``load_state_dict``; the loader pushes it to the workers each time it is iterated.
``state_dict`` stores the epoch and seed; the training loader's own state (vdm.data.loader) holds the
exact stream position, so a run resumed mid-epoch continues with the batches the interrupted one would
have seen next.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch

from vdm.data.buckets import Bucket, bucket_preflight, parse_buckets
from vdm.data.clips import IMAGE_MODES, SHORT_POLICIES, START_MODES, ClipSpec
from vdm.data.decode import BACKENDS
from vdm.data.loader import RESUME_MODES, VideoLoader
from vdm.data.pipeline import Mode, VideoDataset
from vdm.data.samples import batch_to_float
from vdm.data.shards import dist_info, expand_shards, load_manifest, shard_sample_counts

logger = logging.getLogger(__name__)


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"VideoDataModule: `{name}` {message}")


def _validate_args(args: dict[str, Any]) -> None:
    """Type/range checks of VideoDataModule's arguments; ValueError naming the argument."""
    for name in ("num_frames", "frame_stride", "height", "width", "batch_size", "skip_check_after"):
        value = args[name]
        _check(isinstance(value, int) and value >= 1, name, f"must be an int >= 1, got {value!r}")
    for name in ("val_batch_size", "batches_per_epoch", "val_batches", "prefetch_factor"):
        value = args[name]
        ok = value is None or (isinstance(value, int) and value >= 1)
        _check(ok, name, f"must be None or an int >= 1, got {value!r}")
    for name in ("num_workers", "shuffle_buffer"):
        value = args[name]
        _check(isinstance(value, int) and value >= 0, name, f"must be an int >= 0, got {value!r}")
    fps = args["target_fps"]
    _check(fps is None or fps > 0, "target_fps", f"must be None or > 0, got {fps!r}")
    rate = args["max_skip_rate"]
    _check(0.0 <= rate <= 1.0, "max_skip_rate", f"must be in [0, 1], got {rate!r}")
    choices = {
        "short_policy": SHORT_POLICIES,
        "start": START_MODES,
        "crop": START_MODES,
        "image_mode": IMAGE_MODES,
        "backend": BACKENDS,
        "video_dtype": ("float32", "uint8"),
        "resume": RESUME_MODES,
    }
    for name, allowed in choices.items():
        _check(args[name] in allowed, name, f"must be one of {allowed}, got {args[name]!r}")


class VideoDataModule(L.LightningDataModule):
    """Train/val dataloaders of contract batches from webdataset shards (see module docstring).

    Batches: {"video": (B, 3, T, H, W) float32 in [-1, 1], "caption": list[str], "key": list[str],
    "meta": list[dict]}. With ``video_dtype="uint8"`` the loaders yield 0..255 uint8 videos and
    ``on_after_batch_transfer`` converts them on the device, so the LightningModule still gets float32
    in [-1, 1] (unless it overrides that hook itself) with a quarter of the host work and copy volume.
    ``root`` (a corpus directory) fills in ``{root}/train-*.tar``, ``{root}/val-*.tar`` and
    ``{root}/manifest.json`` when those are not given. Loader workers (``persistent_workers``,
    ``prefetch_factor``) apply when ``num_workers > 0``; ``pin_memory="auto"`` pins when CUDA is available.
    Clips are resized (shorter side) to cover (``height``, ``width``) and cropped (``crop``: random or
    center); ``resize=False`` crops at the source resolution. Validation always uses centred clips and crops.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        manifest: str | None = None,
        num_frames: int = 16,
        frame_stride: int = 1,
        target_fps: float | None = None,
        height: int = 256,
        width: int = 256,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        batches_per_epoch: int | None = None,
        val_batches: int | None = None,
        shuffle_buffer: int = 256,
        seed: int = 0,
        short_policy: Literal["skip", "pad", "loop"] = "skip",
        start: Literal["random", "center"] = "random",
        crop: Literal["random", "center"] = "center",
        resize: bool = True,
        image_mode: Literal["repeat", "single"] = "repeat",
        backend: Literal["decord", "pyav"] = "decord",
        max_skip_rate: float = 0.05,
        skip_check_after: int = 100,
        resampled: bool = True,
        buckets: list[list[int]] | list[str] | None = None,
        persistent_workers: bool = False,
        pin_memory: bool | Literal["auto"] = "auto",
        prefetch_factor: int | None = None,
        video_dtype: Literal["float32", "uint8"] = "float32",
        root: str | None = None,
        resume: Literal["exact", "epoch"] = "exact",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        _validate_args(dict(self.hparams))
        pinned = pin_memory in (True, False, "auto")
        _check(pinned, "pin_memory", f"must be true, false or auto, got {pin_memory!r}")
        self._optional_val = False
        if root is not None:
            train_shards = train_shards if train_shards is not None else os.path.join(root, "train-*.tar")
            self._optional_val = val_shards is None  # a corpus without a val split is fine
            val_shards = val_shards if val_shards is not None else os.path.join(root, "val-*.tar")
            manifest = manifest if manifest is not None else os.path.join(root, "manifest.json")
        _check(
            bool(train_shards),
            "train_shards",
            "must name shards (a glob, brace range, pipe: url or list), or set root",
        )
        default = Bucket(height, width, num_frames)
        try:
            self.buckets = parse_buckets(list(buckets) if buckets else None, default)
        except ValueError as exc:
            raise ValueError(f"VideoDataModule: `buckets` {exc}") from exc
        self.clip = ClipSpec(
            num_frames,
            frame_stride=frame_stride,
            target_fps=target_fps,
            start=start,
            short_policy=short_policy,
            image_mode=image_mode,
            crop=crop,
            resize=resize,
        )
        self.train_shards, self.val_shards, self.manifest = train_shards, val_shards, manifest
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers = num_workers
        self.batches_per_epoch, self.val_batches = batches_per_epoch, val_batches
        self.shuffle_buffer, self.seed, self.backend = shuffle_buffer, seed, backend
        self.max_skip_rate, self.skip_check_after, self.resampled = max_skip_rate, skip_check_after, resampled
        self.persistent_workers, self.pin_memory = persistent_workers, pin_memory
        self.prefetch_factor, self.video_dtype, self.resume = prefetch_factor, video_dtype, resume
        self.train_dataset: VideoDataset | None = None
        self.val_dataset: VideoDataset | None = None
        self.bucket_report: dict[str, Any] | None = None
        self._epoch = 0

    # epoch and state

    def _rank_world(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return dist_info()

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def current_epoch(self) -> int:
        """The trainer's epoch when attached, else the one set by set_epoch / load_state_dict."""
        trainer = self._trainer_or_none()
        return int(trainer.current_epoch) if trainer is not None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        """{"epoch", "seed"}: enough to reseed the next epoch's stream (no mid-epoch position)."""
        return {"epoch": self.current_epoch(), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch = int(state_dict.get("epoch", 0))
        if "seed" in state_dict and state_dict["seed"] != self.seed:
            logger.warning(
                "checkpoint data seed %s differs from configured seed %s; using the configured one",
                state_dict["seed"],
                self.seed,
            )

    # datasets

    def _derive_batches_per_epoch(
        self, world: int, manifest: dict[str, Any] | None, urls: Sequence[str]
    ) -> int:
        if manifest is not None and "train" in manifest.get("splits", {}):
            samples = int(manifest["splits"]["train"]["samples"])
        else:
            counts = shard_sample_counts(urls, manifest)
            if counts is None:
                raise ValueError(
                    "VideoDataModule: set `batches_per_epoch` or `manifest` (remote shards are not counted)"
                )
            samples = sum(counts)
        return batches_for(samples, world, self.batch_size)

    def setup(self, stage: str | None = None) -> None:
        rank, world = self._rank_world()
        manifest = load_manifest(self.manifest)
        if stage in (None, "fit") and self.train_dataset is None:
            urls = expand_shards(self.train_shards)
            bpe = self.batches_per_epoch or self._derive_batches_per_epoch(world, manifest, urls)
            if len(self.buckets) > 1 and self.manifest is not None:
                self.bucket_report = bucket_preflight(
                    self.manifest,
                    self.buckets,
                    split="train",
                    frame_stride=self.clip.frame_stride,
                    target_fps=self.clip.target_fps,
                    short_policy=self.clip.short_policy,
                )
                logger.info("bucket preflight: %s", self.bucket_report)
            self.train_dataset = self._dataset(
                urls, self.clip, self.batch_size, "train", bpe, rank, world, None
            )
            logger.info(
                "train: %d shards, %d batches of %d per rank per epoch", len(urls), bpe, self.batch_size
            )
        if stage in (None, "fit", "validate") and self.val_dataset is None and self.val_shards:
            if self._optional_val and not glob.glob(str(self.val_shards)):
                logger.info("no val shards match %s: validation disabled", self.val_shards)
                self.val_shards = None
                return
            urls = expand_shards(self.val_shards)
            counts = shard_sample_counts(urls, manifest)
            val_clip = dataclasses.replace(self.clip, start="center", crop="center")
            self.val_dataset = self._dataset(
                urls, val_clip, self.val_batch_size, "exact", self.val_batches, rank, world, counts
            )

    def _dataset(
        self,
        urls: list[str],
        clip: ClipSpec,
        batch_size: int,
        mode: Mode,
        batches: int | None,
        rank: int,
        world: int,
        counts: list[int] | None,
    ) -> VideoDataset:
        stream = self._stream_args(batch_size, mode, batches, rank, world, counts)
        return VideoDataset(
            urls, clip, buckets=self.buckets, backend=self.backend, video_dtype=self.video_dtype, **stream
        )

    def _stream_args(
        self,
        batch_size: int,
        mode: Mode,
        batches: int | None,
        rank: int,
        world: int,
        counts: list[int] | None,
    ) -> dict[str, Any]:
        """Arguments every dataset of this module shares: batching, shuffling, sharding, skip policy."""
        return {
            "batch_size": batch_size,
            "mode": mode,
            "batches_per_epoch": batches,
            "shuffle_buffer": self.shuffle_buffer if mode == "train" else 0,
            "seed": self.seed,
            "resampled": self.resampled,
            "shard_counts": counts,
            "max_skip_rate": self.max_skip_rate,
            "skip_check_after": self.skip_check_after,
            "rank": rank,
            "world_size": world,
        }

    def _loader(
        self, dataset: VideoDataset | None, name: str, epoch_fn: Callable[[], int] | None
    ) -> VideoLoader:
        if dataset is None:
            raise RuntimeError(f"VideoDataModule.{name}() before setup() (or no shards configured for it)")
        workers = self.num_workers
        return VideoLoader(
            dataset,
            epoch_fn=epoch_fn,
            resume=self.resume,
            num_workers=workers,
            pin_memory=torch.cuda.is_available() if self.pin_memory == "auto" else bool(self.pin_memory),
            persistent_workers=self.persistent_workers and workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )

    def train_dataloader(self) -> VideoLoader:
        return self._loader(self.train_dataset, "train_dataloader", self.current_epoch)

    def val_dataloader(self) -> VideoLoader | list[Any]:
        if not self.val_shards:
            return []
        return self._loader(self.val_dataset, "val_dataloader", None)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 videos (``video_dtype="uint8"``) become float32 in [-1, 1] on the device."""
        return batch_to_float(batch) if isinstance(batch, dict) and "video" in batch else batch

    def skip_summary(self) -> dict[str, dict[str, float]]:
        """Skip counters summed over all workers per split: {"train": {"seen", "ok", "skipped", "rate"}}."""
        out = {}
        for name, dataset in (("train", self.train_dataset), ("val", self.val_dataset)):
            if dataset is not None:
                out[name] = dataset.skip_counters.summary()
        return out


def batches_for(samples: int, world_size: int, batch_size: int) -> int:
    """Batches per rank per epoch for ``samples`` training samples (at least 1)."""
    return max(1, samples // (world_size * batch_size))
