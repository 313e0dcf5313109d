"""Streaming WebDataset pipeline: shards -> raw samples -> decoded clips -> one-shape batches.

Every DataLoader worker of every rank is a *slot* ``rank * num_workers + worker`` of
``world_size * num_workers``. Batches are built inside the workers (DataLoader ``batch_size=None``)
so each batch comes from one bucket.

Training mode (``mode="train"``): each rank yields exactly ``batches_per_epoch`` batches per epoch,
split over its workers (worker w yields ``n // W + (w < n % W)``), from an endless stream, so uneven
shards can never leave one rank waiting in a collective. The stream is either resampled (each slot
draws shards with replacement, seeded by seed/epoch/rank/worker) or cycled (every pass shuffles the
shard list with a seed shared by all slots, then slot s takes shards ``s::slots``; with fewer shards
than slots every slot reads all shards and keeps sample k of the pass's shard i when
``(k + i + pass) % slots == s``). A seeded shuffle buffer of encoded samples mixes samples within each
worker. Epochs restart the stream with new seeds. The stream's position is exact and restorable (see
vdm.data.stream): with ``track_position`` each batch carries ``"_stream": (worker, snapshot)``, and
``resume`` (set by the loader from a checkpoint) makes the workers continue mid-epoch.

Exact mode (``mode="exact"``, validation/evaluation): each sample is read by exactly one slot, in
order, no shuffling: shard ``i`` goes to slot ``i % slots`` when there are at least as many shards as
slots, else every slot reads all shards and keeps samples ``j % slots == s`` (``split=`` forces one).
Partial bucket buffers are flushed at the end. With several ranks, every slot then pads to the same
batch count: ``K = max_s ceil(n_s / B) + (buckets - 1)`` (an upper bound on any slot's batches) from
per-shard sample counts (manifest or a scan of local tars); padded entries duplicate real samples and
carry ``meta["pad"] = True``, so every rank runs the same number of validation steps and metrics drop
the duplicates. A ``batches_per_epoch`` cap makes every rank yield exactly that many batches.

Rank/world come from the constructor, else torch.distributed when initialised, else env RANK /
WORLD_SIZE; the worker id from ``torch.utils.data.get_worker_info``. ``set_epoch`` writes a
shared-memory counter, so persistent workers see it too.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset

from vdm.data.buckets import Bucket, BucketBatcher
from vdm.data.clips import ClipSpec
from vdm.data.decode import BACKENDS, Backend
from vdm.data.samples import SKIPPABLE, Clip, collate_clips, decode_clip
from vdm.data.shards import SHARD_ERRORS, dist_info, expand_shards, iter_shard, worker_info
from vdm.data.skips import SharedSkipCounters, SkipStats, skip_reason
from vdm.data.stream import TrainStream
from vdm.utils.seeding import derive_seed

logger = logging.getLogger(__name__)

Mode = Literal["train", "exact"]


def quota(total: int, parts: int, index: int) -> int:
    """Share ``index`` of ``total`` split over ``parts`` as evenly as possible."""
    return total // parts + (1 if index < total % parts else 0)


class VideoDataset(IterableDataset):
    """Iterable of contract batches {"video": (B, 3, T, H, W) float32 in [-1, 1], "caption", "key", "meta"}.

    ``video_dtype="uint8"`` yields 0..255 videos instead (a quarter of the bytes to build, share and copy
    to the accelerator); ``vdm.data.samples.batch_to_float`` converts them there.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        clip: ClipSpec,
        *,
        buckets: Sequence[Bucket],
        batch_size: int,
        mode: Mode = "train",
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        resampled: bool = True,
        split: Literal["auto", "shards", "samples"] = "auto",
        shard_counts: Sequence[int] | None = None,
        backend: Backend = "decord",
        max_skip_rate: float = 0.05,
        skip_check_after: int = 100,
        rank: int | None = None,
        world_size: int | None = None,
        decode_threads: int = 1,
        video_dtype: Literal["float32", "uint8"] = "float32",
    ) -> None:
        super().__init__()
        if mode not in ("train", "exact"):
            raise ValueError(f"mode must be 'train' or 'exact', got {mode!r}")
        if mode == "train" and (batches_per_epoch is None or batches_per_epoch < 1):
            raise ValueError(f"training mode needs batches_per_epoch >= 1, got {batches_per_epoch}")
        if split not in ("auto", "shards", "samples"):
            raise ValueError(f"split must be 'auto', 'shards' or 'samples', got {split!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if video_dtype not in ("float32", "uint8"):
            raise ValueError(f"video_dtype must be 'float32' or 'uint8', got {video_dtype!r}")
        if batch_size < 1 or not buckets:
            raise ValueError(f"need batch_size >= 1 and at least one bucket, got {batch_size}, {buckets}")
        self.urls = expand_shards(shards)
        if shard_counts is not None and len(shard_counts) != len(self.urls):
            raise ValueError(f"shard_counts has {len(shard_counts)} entries for {len(self.urls)} shards")
        self.clip, self.buckets, self.batch_size, self.mode = clip, list(buckets), batch_size, mode
        self.batches_per_epoch, self.shuffle_buffer, self.seed = batches_per_epoch, shuffle_buffer, seed
        self.resampled, self.split, self.backend = resampled, split, backend
        self.shard_counts = list(shard_counts) if shard_counts is not None else None
        self.max_skip_rate, self.skip_check_after = max_skip_rate, skip_check_after
        self.rank, self.world_size, self.decode_threads = rank, world_size, decode_threads
        self.video_dtype = torch.uint8 if video_dtype == "uint8" else torch.float32
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.skip_counters = SharedSkipCounters()
        # training mode: batches carry their stream snapshot; ``resume`` continues an epoch mid-way
        # ({"epoch", "offset": batches consumed % workers, "workers": {logical worker: snapshot}})
        self.track_position = False
        self.resume: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Seed shuffling and clip sampling of the next iteration with ``epoch`` (all workers)."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def __len__(self) -> int:
        """Batches per rank per epoch in training mode (exact mode has no fixed length: TypeError)."""
        if self.mode != "train" or self.batches_per_epoch is None:
            raise TypeError("exact-mode VideoDataset has no fixed length")
        return self.batches_per_epoch

    def _identity(self) -> tuple[int, int, int, int]:
        rank, world = dist_info()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world_size {world}")
        worker, num_workers = worker_info()
        return rank, world, worker, num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, num_workers = self._identity()
        if torch.utils.data.get_worker_info() is not None:
            torch.set_num_threads(1)  # workers run in parallel already
        slot, slots, epoch = rank * num_workers + worker, world * num_workers, self.epoch
        stats = SkipStats(self.max_skip_rate, self.skip_check_after, where=f"rank {rank} worker {worker}")
        rng = np.random.default_rng(derive_seed(self.seed, epoch, rank, worker, "clips"))
        if self.mode == "train":
            yield from self._train_batches(rank, world, worker, num_workers, epoch, stats)
            return
        yield from self._exact_batches(slot, slots, world, worker, num_workers, stats, rng)

    # raw sample streams

    def _read(
        self, urls: Iterable[str], stats: SkipStats, slot: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Raw samples of the shards in order (see ``read_shard``)."""
        for url in urls:
            yield from self.read_shard(url, stats, slot)

    def read_shard(
        self, url: str, stats: SkipStats, slot: int | None = None, skip: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard from sample index ``skip``; a broken shard is logged and left, and
        counted as one skip in the shared counters of ``slot`` (None: not counted, another slot reads it)."""
        try:
            yield from iter_shard(url, skip=skip)
        except SHARD_ERRORS as exc:
            if slot is not None:
                self.skip_counters.add(slot, skipped=1, reason="shard")
            stats.record_skip("<shard>", url, exc)

    def _train_batches(
        self, rank: int, world: int, worker: int, num_workers: int, epoch: int, stats: SkipStats
    ) -> Iterator[dict[str, Any]]:
        """This worker's share of the epoch's batches; mid-epoch after a resume (see vdm.data.stream)."""
        resume = self.resume if self.resume is not None and self.resume["epoch"] == epoch else None
        # after a resume the DataLoader asks worker 0 first, so workers are rotated to keep the order
        logical = (worker + (resume["offset"] if resume else 0)) % num_workers
        count = quota(self.batches_per_epoch or 0, num_workers, logical)
        slot = rank * num_workers + logical
        stream = TrainStream(
            self,
            slot=slot,
            slots=world * num_workers,
            epoch=epoch,
            rank=rank,
            worker=logical,
            stats=stats,
        )
        snap = resume["workers"].get(logical) if resume else None
        for batch, after in stream.batches(count, snap):
            if self.track_position:
                batch["_stream"] = (logical, after)
            yield batch

    def _exact_split(self, slots: int) -> str:
        if self.split != "auto":
            return self.split
        return "shards" if len(self.urls) >= slots else "samples"

    def _exact_stream(self, slot: int, slots: int, stats: SkipStats) -> Iterator[dict[str, Any]]:
        if self._exact_split(slots) == "shards":
            return self._read(self.urls[slot::slots], stats, slot)
        counted = slot if slot == 0 else None  # every slot reads every shard: count a broken one once
        return (s for j, s in enumerate(self._read(self.urls, stats, counted)) if j % slots == slot)

    def _slot_sample_count(self, slot: int, slots: int) -> int:
        counts = self.shard_counts or []
        if self._exact_split(slots) == "shards":
            return sum(counts[slot::slots])
        return len(range(slot, sum(counts), slots))

    # decoding and batching

    def _clips(
        self, raw: Iterable[dict[str, Any]], stats: SkipStats, rng: np.random.Generator, slot: int
    ) -> Iterator[Clip]:
        for sample in raw:
            clip = self.decode_counted(sample, rng, stats, slot)
            if clip is not None:
                yield clip

    def decode_counted(
        self, sample: dict[str, Any], rng: np.random.Generator, stats: SkipStats, slot: int
    ) -> Any | None:
        """``_decode`` with the outcome counted for ``slot`` (and a skip logged with its reason); None
        for a skipped sample."""
        try:
            clip = self._decode(sample, rng)
        except SKIPPABLE as exc:
            self.skip_counters.add(slot, skipped=1, reason=skip_reason(exc))
            stats.record_skip(str(sample.get("__key__")), str(sample.get("__url__")), exc)
            return None
        self.skip_counters.add(slot, ok=1)
        stats.record_ok()
        return clip

    def _decode(self, sample: dict[str, Any], rng: np.random.Generator) -> Any:
        """One raw sample -> a decoded item with ``bucket``, ``key``, ``padded_copy()``; raises SKIPPABLE."""
        return decode_clip(
            sample, self.clip, self.buckets, rng=rng, backend=self.backend, decode_threads=self.decode_threads
        )

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        """Decoded items of one bucket -> a batch."""
        return collate_clips(items, self.video_dtype)

    def _batches(self, clips: Iterable[Clip], *, flush: bool, pad: bool = False) -> Iterator[dict[str, Any]]:
        batcher: BucketBatcher[Clip] = BucketBatcher(self.batch_size)
        for clip in clips:
            full = batcher.add(clip.bucket, clip)
            if full is not None:
                yield self.collate(full)
        if flush:
            for _, items in batcher.flush():
                if pad:
                    items = items + [
                        items[i % len(items)].padded_copy() for i in range(self.batch_size - len(items))
                    ]
                yield self.collate(items)

    def _exact_target(self, world: int, worker: int, num_workers: int) -> int | None:
        """Batches this slot must yield in exact mode; None when no padding is needed (one rank)."""
        if self.batches_per_epoch is not None:
            return quota(self.batches_per_epoch, num_workers, worker)
        if world == 1:
            return None
        if self.shard_counts is None:
            raise ValueError(
                f"exact mode over {world} ranks needs per-shard sample counts to give every rank the same "
                "number of batches: pass a manifest (shard_counts) or use local shards"
            )
        slots = world * num_workers
        most = max(math.ceil(self._slot_sample_count(s, slots) / self.batch_size) for s in range(slots))
        return most + len(self.buckets) - 1

    def _exact_batches(
        self,
        slot: int,
        slots: int,
        world: int,
        worker: int,
        num_workers: int,
        stats: SkipStats,
        rng: np.random.Generator,
    ) -> Iterator[dict[str, Any]]:
        target = self._exact_target(world, worker, num_workers)
        clips = self._clips(self._exact_stream(slot, slots, stats), stats, rng, slot)
        batches = self._batches(clips, flush=True, pad=target is not None)
        if target is None:
            yield from batches
            return
        last: dict[str, Any] | None = None
        for last in itertools.islice(batches, target):
            yield last
            target -= 1
        if target <= 0:
            return
        template = self._pad_batch(last, rng)
        for _ in range(target):
            yield template

    def _pad_batch(self, last: dict[str, Any] | None, rng: np.random.Generator) -> dict[str, Any]:
        """A batch of duplicates flagged ``pad``: of the last batch, else of the first decodable sample."""
        if last is not None:
            meta = [dict(m, pad=True) for m in last["meta"]]
            return {**last, "meta": meta, "caption": list(last["caption"]), "key": list(last["key"])}
        for raw in self._read(self.urls, SkipStats(max_skip_rate=1.0)):
            try:
                clip = self._decode(raw, rng)
            except SKIPPABLE:
                continue
            return self.collate([clip.padded_copy() for _ in range(self.batch_size)])
        raise RuntimeError(f"no decodable sample in shards {self.urls[:3]}... to pad exact-mode batches with")
