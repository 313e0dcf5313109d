"""Buckets: parsing, assignment by aspect ratio then frames, one shape per batch, preflight report."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.helpers.shards import image_item, video_item, write_corpus
from vdm.data.buckets import (
    Bucket,
    BucketBatcher,
    EmptyBucketError,
    assign_bucket,
    bucket_preflight,
    parse_buckets,
)
from vdm.data.clips import ClipSpec
from vdm.data.datamodule import VideoLoader
from vdm.data.pipeline import VideoDataset

BUCKETS = [Bucket(16, 16, 4), Bucket(16, 16, 8), Bucket(16, 32, 4)]


def test_parse_buckets() -> None:
    default = Bucket(32, 32, 8)
    assert parse_buckets(None, default) == [default]
    assert parse_buckets([[16, 32, 4], "8x8x2", {"height": 4, "width": 4, "num_frames": 1}], default) == [
        Bucket(16, 32, 4),
        Bucket(8, 8, 2),
        Bucket(4, 4, 1),
    ]
    with pytest.raises(ValueError, match="twice"):
        parse_buckets(["8x8x2", [8, 8, 2]], default)
    with pytest.raises(ValueError, match="HxWxT"):
        parse_buckets(["8x8"], default)


def test_assign_bucket_by_aspect_then_frames() -> None:
    assert assign_bucket(BUCKETS, 90, 160, 100) == Bucket(16, 32, 4)  # 16:9 is closest to 2:1
    assert assign_bucket(BUCKETS, 100, 110, 100) == Bucket(16, 16, 8)  # most frames that fit
    assert assign_bucket(BUCKETS, 100, 110, 6) == Bucket(16, 16, 4)
    assert assign_bucket(BUCKETS, 100, 110, 8, step=2.0) == Bucket(16, 16, 4)  # 8 frames at stride 2 need 15
    assert assign_bucket(BUCKETS, 100, 110, 3) is None
    assert assign_bucket(BUCKETS, 100, 110, 3, allow_short=True) == Bucket(16, 16, 4)
    assert assign_bucket(BUCKETS, 300, 100, 100) == Bucket(16, 16, 8)  # portrait: square is closest


def test_bucket_batcher() -> None:
    batcher: BucketBatcher[int] = BucketBatcher(2)
    a, b = Bucket(8, 8, 1), Bucket(8, 16, 1)
    assert batcher.add(a, 1) is None and batcher.add(b, 2) is None
    assert batcher.add(a, 3) == [1, 3]
    assert batcher.add(b, 4) == [2, 4] and batcher.add(b, 5) is None
    assert list(batcher.flush()) == [(b, [5])] and batcher.pending() == 0


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    items = [video_item(f"sq{i}", frames=12, height=32, width=32, seed=i) for i in range(5)]
    items += [video_item(f"short{i}", frames=6, height=32, width=32) for i in range(3)]
    items += [video_item(f"wide{i}", frames=12, height=24, width=48) for i in range(4)]
    items += [video_item("tiny", frames=2, height=32, width=32), image_item("img", 32, 64)]
    return write_corpus(root, {"train": [items[:7], items[7:]]})


def test_every_batch_has_one_shape(mixed: Path) -> None:
    dataset = VideoDataset(
        str(mixed.parent / "train-*.tar"),
        ClipSpec(4, start="center"),
        buckets=BUCKETS,
        batch_size=2,
        mode="exact",
        max_skip_rate=1.0,
    )
    batches = list(VideoLoader(dataset, num_workers=2))
    shapes = Counter()
    for batch in batches:
        shape = tuple(batch["video"].shape[2:])
        assert {len(m["frame_indices"]) for m in batch["meta"]} == {shape[0]}
        shapes[shape] += len(batch["key"])
    # 5 long squares -> 8 frames, 3 short squares -> 4 frames, 4 wide + the wide image -> 16x32,
    # "tiny" skipped
    assert shapes == {(8, 16, 16): 5, (4, 16, 16): 3, (4, 16, 32): 5}
    assert dataset.skip_counters.summary()["skipped"] == 1


def test_preflight_counts_and_empty_bucket(mixed: Path) -> None:
    report = bucket_preflight(mixed, BUCKETS, split="train")
    assert report["samples"] == 14 and report["too_short"] == 1
    assert report["buckets"] == {"16x16x4": 3, "16x16x8": 5, "16x32x4": 5}
    padded = bucket_preflight(mixed.parent / "samples.jsonl", BUCKETS, short_policy="pad")
    assert padded["buckets"]["16x16x4"] == 4 and padded["too_short"] == 0
    with pytest.raises(EmptyBucketError, match="32x16x4"):
        bucket_preflight(mixed, [*BUCKETS, Bucket(32, 16, 4)])
    report = bucket_preflight(mixed, [*BUCKETS, Bucket(32, 16, 4)], require_nonempty=False)
    assert report["buckets"]["32x16x4"] == 0
    with pytest.raises(FileNotFoundError, match="samples"):
        bucket_preflight(mixed.parent / "missing" / "samples.jsonl", BUCKETS)
