"""The training stream of one loader worker, with a position that can be saved and restored exactly.

Every raw sample of a worker's stream has a position ``(round, shard, sample)``: the round (a pass over
the shard list: a shuffled order when cycling, a draw with replacement when resampling), the shard's
index in that round's list for this slot, and the sample's index inside the shard. Everything random
is a function of positions and seeds, never of how much was read before:

- the shard list of each round comes from (seed, epoch, round) or from a seeded per-slot draw;
- with fewer shards than slots, sample ``k`` of shard ``i`` in round ``r`` belongs to slot
  ``(k + i + r) % slots``;
- the clip start and crop of a sample come from a generator seeded by its position;
- the shuffle buffer's generator state is saved with it.

After each batch the stream reports a *snapshot*: the last position read, the positions held in the
shuffle buffer, the shuffle generator's state, the positions decoded but waiting in partial bucket
buffers, and the number of batches emitted. Restoring reads the shards again only where a snapshot
points (local tars are entered by seeking to the sample's tar header), re-decodes the waiting samples
and continues: the batches that follow are bit-identical to those of the uninterrupted stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from vdm.data.buckets import BucketBatcher
from vdm.data.shards import SHARD_ERRORS, iter_shard
from vdm.data.skips import SkipStats
from vdm.utils.seeding import derive_seed

Pos = tuple[int, int, int]
Snapshot = dict[str, Any]


class StreamSource(Protocol):
    """What a stream reads from (``vdm.data.pipeline.VideoDataset`` and its subclasses)."""

    urls: list[str]
    seed: int
    batch_size: int
    shuffle_buffer: int
    resampled: bool

    def read_shard(
        self, url: str, stats: SkipStats, slot: int | None = None, skip: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard from sample index ``skip``."""
        ...

    def decode_counted(
        self, sample: dict[str, Any], rng: np.random.Generator, stats: SkipStats, slot: int
    ) -> Any | None:
        """One raw sample decoded (None when skipped), the outcome counted for ``slot``."""
        ...

    def collate(self, items: list[Any]) -> dict[str, Any]:
        """Decoded items of one bucket -> a batch."""
        ...


class StreamRestoreError(RuntimeError):
    """A saved data-stream position cannot be restored (a shard changed or is unreadable)."""


class TrainStream:
    """Endless decoded batches of one logical worker (slot) for one epoch, resumable from a snapshot."""

    def __init__(
        self,
        dataset: StreamSource,
        *,
        slot: int,
        slots: int,
        epoch: int,
        rank: int,
        worker: int,
        stats: SkipStats,
    ) -> None:
        self.ds, self.slot, self.slots, self.epoch = dataset, slot, slots, epoch
        self.rank, self.worker, self.stats = rank, worker, stats
        self.last: Pos | None = None
        self.buffer: list[tuple[Pos, dict[str, Any]]] = []
        self.shuffle_rng = random.Random(derive_seed(dataset.seed, epoch, rank, worker, "shuffle"))
        self.batcher: BucketBatcher[tuple[Pos, Any]] = BucketBatcher(dataset.batch_size)
        self.emitted = 0

    # shard rounds and raw samples

    def rounds(self) -> Iterator[tuple[int, list[str], bool]]:
        """(round, shard urls of this slot, whether samples are split between slots) for every round."""
        ds, urls = self.ds, self.ds.urls
        if ds.resampled:
            rng = random.Random(derive_seed(ds.seed, self.epoch, self.rank, self.worker, "resample"))
            r = 0
            while True:
                yield r, [rng.choice(urls) for _ in range(len(urls))], False
                r += 1
        r = 0
        while True:
            order = list(urls)
            random.Random(derive_seed(ds.seed, self.epoch, r, "shards")).shuffle(order)
            if len(order) >= self.slots:
                yield r, order[self.slot :: self.slots], False
            else:
                yield r, order, True
            r += 1

    def _shard(self, url: str, skip: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(sample index, raw sample) of one shard from index ``skip``; a broken shard is one counted skip."""
        return enumerate(self.ds.read_shard(url, self.stats, self.slot, skip), start=skip)

    def source(self, start: Pos = (0, 0, 0)) -> Iterator[tuple[Pos, dict[str, Any]]]:
        """Raw samples of this slot from position ``start`` on (endless)."""
        r0, i0, k0 = start
        idle = 0
        for r, urls, split in self.rounds():
            if r < r0:
                continue
            got = 0
            for i, url in enumerate(urls):
                if r == r0 and i < i0:
                    continue
                for k, sample in self._shard(url, k0 if (r, i) == (r0, i0) else 0):
                    if split and (k + i + r) % self.slots != self.slot:
                        continue
                    got += 1
                    yield (r, i, k), sample
            idle = 0 if got or r == r0 else idle + 1
            if idle > max(4, self.slots):
                raise RuntimeError(
                    f"slot {self.slot} of {self.slots} got no samples in {idle} passes over {urls[:3]}..."
                )

    def fetch(self, positions: Iterable[Pos]) -> dict[Pos, dict[str, Any]]:
        """The raw samples at ``positions`` (read again from their shards)."""
        wanted: dict[tuple[int, int], set[int]] = {}
        for r, i, k in positions:
            wanted.setdefault((r, i), set()).add(k)
        found: dict[Pos, dict[str, Any]] = {}
        last_round = max((r for r, _ in wanted), default=-1)
        for r, urls, _ in self.rounds():
            if r > last_round:
                break
            for i, url in enumerate(urls):
                ks = wanted.get((r, i))
                if not ks:
                    continue
                try:
                    for k, sample in enumerate(iter_shard(url, skip=min(ks)), start=min(ks)):
                        if k in ks:
                            found[(r, i, k)] = sample
                        if k >= max(ks):
                            break
                except SHARD_ERRORS as exc:
                    message = f"cannot read shard {url} again to restore the data stream"
                    raise StreamRestoreError(message) from exc
                missing = sorted(k for k in ks if (r, i, k) not in found)
                if missing:
                    raise StreamRestoreError(
                        f"shard {url} no longer has samples {missing[:5]} that the saved data stream holds; "
                        "the shards changed since the checkpoint"
                    )
        return found

    # decoding, shuffling, batching

    def decode(self, pos: Pos, sample: dict[str, Any]) -> Any | None:
        """The decoded clip of a sample (its random start/crop seeded by its position); None if skipped."""
        seed = derive_seed(self.ds.seed, self.epoch, self.rank, self.worker, *pos, "clip")
        return self.ds.decode_counted(sample, np.random.default_rng(seed), self.stats, self.slot)

    def shuffled(self, source: Iterator[tuple[Pos, dict[str, Any]]]) -> Iterator[tuple[Pos, dict[str, Any]]]:
        """Buffered shuffle: keep ``shuffle_buffer`` samples, emit a random one as each new one arrives."""
        size = self.ds.shuffle_buffer
        for item in source:
            self.last = item[0]
            if size <= 1:
                yield item
                continue
            if len(self.buffer) < size:
                self.buffer.append(item)
                continue
            index = self.shuffle_rng.randrange(size)
            out, self.buffer[index] = self.buffer[index], item
            yield out

    def snapshot(self) -> Snapshot:
        """The stream's position after the batch just emitted (plain Python values, weights-only loadable)."""
        pending = [pos for _, items in self.batcher.items() for pos, _ in items]
        return {
            "last": self.last,
            "buffer": [pos for pos, _ in self.buffer],
            "rng": self.shuffle_rng.getstate(),
            "pending": pending,
            "emitted": self.emitted,
        }

    def restore(self, snap: Snapshot) -> Pos:
        """Put back the buffer, generator and waiting clips of ``snap``; returns the next position to read."""
        buffered, pending = [tuple(p) for p in snap["buffer"]], [tuple(p) for p in snap["pending"]]
        samples = self.fetch(buffered + pending)
        self.buffer = [(pos, samples[pos]) for pos in buffered]
        version, internal, gauss = snap["rng"]
        self.shuffle_rng.setstate((version, tuple(internal), gauss))
        for pos in pending:
            clip = self.decode(pos, samples[pos])
            if clip is None:
                raise StreamRestoreError(f"sample {samples[pos].get('__key__')} decoded before but fails now")
            self.batcher.add(clip.bucket, (pos, clip))
        self.emitted, self.last = int(snap["emitted"]), tuple(snap["last"])
        r, i, k = self.last
        return (r, i, k + 1)

    def batches(self, count: int, snap: Snapshot | None = None) -> Iterator[tuple[dict[str, Any], Snapshot]]:
        """(batch, snapshot after it) until ``count`` batches have been emitted in this epoch in all."""
        start = self.restore(snap) if snap is not None else (0, 0, 0)
        if self.emitted >= count:
            return
        for pos, sample in self.shuffled(self.source(start)):
            clip = self.decode(pos, sample)
            if clip is None:
                continue
            full = self.batcher.add(clip.bucket, (pos, clip))
            if full is None:
                continue
            self.emitted += 1
            yield self.ds.collate([c for _, c in full]), self.snapshot()
            if self.emitted >= count:
                return
