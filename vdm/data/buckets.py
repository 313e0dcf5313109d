"""Aspect-ratio / length buckets: every batch has one (height, width, num_frames) shape.

A sample goes to the bucket whose aspect ratio (width / height) is closest in log space; among the
buckets of that aspect ratio it takes the one with the most frames whose clip still fits in the
video (``frames_needed(num_frames, step) <= source frames``). When none fits, the ``skip`` policy
drops the sample (counted as too short) and ``pad`` / ``loop`` take the shortest bucket of that
aspect ratio. Images count as one-frame videos. The pipeline keeps one buffer per bucket and emits a
batch when a buffer holds ``batch_size`` samples.

``bucket_preflight`` applies the same rule to the manifest's samples.jsonl before training and raises
EmptyBucketError naming any configured bucket that would receive no samples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from vdm.data.clips import SHORT_POLICIES, ClipError, frame_step, frames_needed

T = TypeVar("T")
BucketLike = Sequence[int] | Mapping[str, int] | str


class EmptyBucketError(ValueError):
    """A configured bucket would receive no samples from the corpus."""


@dataclass(frozen=True, order=True)
class Bucket:
    """One batch shape: clips of ``num_frames`` frames at ``height`` x ``width`` pixels."""

    height: int
    width: int
    num_frames: int

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.num_frames) < 1:
            raise ValueError(f"bucket sizes must be >= 1, got {self.name}")

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    @property
    def name(self) -> str:
        """ "HxWxT", e.g. "256x448x16"."""
        return f"{self.height}x{self.width}x{self.num_frames}"


def parse_buckets(buckets: Iterable[BucketLike] | None, default: Bucket) -> list[Bucket]:
    """Buckets from config: [h, w, T] lists, {"height", "width", "num_frames"} dicts or "HxWxT"
    strings; ``None`` or empty gives ``[default]``. Duplicates are an error."""
    if not buckets:
        return [default]
    out: list[Bucket] = []
    for item in buckets:
        if isinstance(item, str):
            parts = item.lower().split("x")
            if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"bucket string must look like 'HxWxT' (e.g. '256x256x16'), got {item!r}")
            bucket = Bucket(*(int(p) for p in parts))
        elif isinstance(item, Mapping):
            missing = {"height", "width", "num_frames"} - set(item)
            if missing:
                raise ValueError(f"bucket {dict(item)} lacks keys {sorted(missing)}")
            bucket = Bucket(int(item["height"]), int(item["width"]), int(item["num_frames"]))
        else:
            values = list(item)
            if len(values) != 3:
                raise ValueError(f"bucket must be [height, width, num_frames], got {values}")
            bucket = Bucket(*(int(v) for v in values))
        if bucket in out:
            raise ValueError(f"bucket {bucket.name} is listed twice")
        out.append(bucket)
    return out


def assign_bucket(
    buckets: Sequence[Bucket],
    height: int,
    width: int,
    num_source_frames: int,
    *,
    step: float = 1.0,
    allow_short: bool = False,
) -> Bucket | None:
    """The bucket for a (height, width) source with ``num_source_frames`` frames; None when the
    sample is too short for every bucket of its aspect ratio and ``allow_short`` is False."""
    if height < 1 or width < 1:
        raise ValueError(f"source size must be positive, got {height}x{width}")
    log_aspect = math.log(width / height)
    distance = [abs(math.log(b.aspect) - log_aspect) for b in buckets]
    best = min(distance)
    group = [b for b, d in zip(buckets, distance) if d <= best + 1e-9]
    fits = [b for b in group if frames_needed(b.num_frames, step) <= num_source_frames]
    if fits:
        return max(fits, key=lambda b: b.num_frames)
    return min(group, key=lambda b: b.num_frames) if allow_short else None


class BucketBatcher(Generic[T]):
    """Per-bucket buffers: ``add`` returns a full list of ``batch_size`` items of one bucket, else None."""

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._buffers: dict[Bucket, list[T]] = {}

    def add(self, bucket: Bucket, item: T) -> list[T] | None:
        buffer = self._buffers.setdefault(bucket, [])
        buffer.append(item)
        if len(buffer) < self.batch_size:
            return None
        self._buffers[bucket] = []
        return buffer

    def flush(self) -> Iterator[tuple[Bucket, list[T]]]:
        """Partial buffers (fewer than batch_size items), in bucket order, emptied as they go."""
        for bucket in sorted(self._buffers):
            items = self._buffers.pop(bucket)
            if items:
                yield bucket, items

    def items(self) -> list[tuple[Bucket, list[T]]]:
        """The partial buffers (bucket, items), in the order the buckets first appeared; not emptied."""
        return [(bucket, list(items)) for bucket, items in self._buffers.items()]

    def pending(self) -> int:
        """Items waiting in partial buffers."""
        return sum(len(v) for v in self._buffers.values())


def resolve_index_path(path: str | Path) -> Path:
    """samples.jsonl from a manifest.json (its "index" entry, relative to it) or given directly."""
    path = Path(path)
    if path.suffix == ".json":
        manifest = json.loads(path.read_text())
        return path.parent / manifest.get("index", "samples.jsonl")
    return path


def bucket_preflight(
    index: str | Path,
    buckets: Sequence[Bucket],
    *,
    split: str = "train",
    frame_stride: int = 1,
    target_fps: float | None = None,
    short_policy: str = "skip",
    require_nonempty: bool = True,
) -> dict[str, Any]:
    """Samples per bucket for ``split`` of a corpus index (manifest.json or samples.jsonl).

    Returns {"index", "split", "samples", "too_short", "unknown_fps", "buckets": {name: count}}.
    Raises EmptyBucketError naming each empty bucket when ``require_nonempty``.
    """
    if short_policy not in SHORT_POLICIES:
        raise ValueError(f"short_policy must be one of {SHORT_POLICIES}, got {short_policy!r}")
    path = resolve_index_path(index)
    if not path.is_file():
        raise FileNotFoundError(f"sample index {path} not found (from {index}); it is written by data_prep")
    counts = {b.name: 0 for b in buckets}
    total = too_short = unknown_fps = 0
    with path.open() as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("split") != split:
                continue
            total += 1
            is_image = row.get("kind") == "image"
            try:
                step = 1.0 if is_image else frame_step(frame_stride, target_fps, row.get("fps"))
            except ClipError:
                unknown_fps += 1
                continue
            frames = 1 if is_image else int(row.get("frames", 0))
            allow = short_policy != "skip" or is_image
            bucket = assign_bucket(
                buckets, int(row["height"]), int(row["width"]), frames, step=step, allow_short=allow
            )
            if bucket is None:
                too_short += 1
            else:
                counts[bucket.name] += 1
    report = {
        "index": str(path),
        "split": split,
        "samples": total,
        "too_short": too_short,
        "unknown_fps": unknown_fps,
        "buckets": counts,
    }
    empty = [name for name, n in counts.items() if n == 0]
    if require_nonempty and empty:
        raise EmptyBucketError(
            f"bucket(s) {', '.join(empty)} would get no {split!r} samples from {path} "
            f"({total} samples, {too_short} too short; counts {counts}): remove them from `buckets` "
            f"or add matching data"
        )
    return report
