"""WebDataset pipeline: shard specs, batches, exactly-once exact mode, equal batch counts, skips, seeding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.shards import corrupt_item, simple_corpus, video_item, write_corpus
from vdm.data.buckets import Bucket
from vdm.data.clips import ClipSpec
from vdm.data.loader import VideoLoader
from vdm.data.pipeline import VideoDataset
from vdm.data.samples import batch_to_float, decode_clip
from vdm.data.shards import expand_shards, iter_shard, shard_sample_counts
from vdm.data.skips import SkipRateError

BUCKET = [Bucket(16, 16, 4)]


def make(shards: Any, **kwargs: Any) -> VideoDataset:
    defaults: dict[str, Any] = {"buckets": BUCKET, "batch_size": 2, "mode": "exact", "seed": 0}
    clip = kwargs.pop("clip", ClipSpec(4, start="center"))
    return VideoDataset(shards, clip, **{**defaults, **kwargs})


def run(dataset: VideoDataset, workers: int = 0, epoch: int | None = None) -> list[dict[str, Any]]:
    loader = VideoLoader(dataset, num_workers=workers, epoch_fn=None if epoch is None else (lambda: epoch))
    return list(loader)


def keys_of(batches: list[dict[str, Any]], with_pad: bool = False) -> list[str]:
    return [k for b in batches for k, m in zip(b["key"], b["meta"]) if with_pad or not m["pad"]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    simple_corpus(root, [3, 1, 4, 2, 5], val_sizes=[4, 3])
    return root


def all_keys(root: Path, split: str) -> list[str]:
    return [
        json.loads(line)["key"]
        for line in (root / "samples.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == split
    ]


def test_expand_shards(corpus: Path) -> None:
    globbed = expand_shards(str(corpus / "train-*.tar"))
    assert [Path(u).name for u in globbed] == [f"train-{i:06d}.tar" for i in range(5)]
    assert expand_shards(str(corpus / "train-{000000..000004}.tar")) == globbed
    assert expand_shards([str(corpus / "train-00000[0-1].tar"), str(corpus / "val-*.tar")])[2].endswith(
        "val-000000.tar"
    )
    assert expand_shards("pipe:cat /x/train-{000000..000001}.tar") == [
        "pipe:cat /x/train-000000.tar",
        "pipe:cat /x/train-000001.tar",
    ]
    with pytest.raises(FileNotFoundError, match="nothing-\\*.tar"):
        expand_shards(str(corpus / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        expand_shards(str(corpus / "missing.tar"))
    assert shard_sample_counts(globbed) == [3, 1, 4, 2, 5]


def test_round_trip_batches(corpus: Path) -> None:
    batches = run(
        make(
            str(corpus / "train-*.tar"),
            mode="train",
            batches_per_epoch=3,
            shuffle_buffer=4,
            clip=ClipSpec(4, frame_stride=2),
        )
    )
    assert len(batches) == 3
    for batch in batches:
        assert set(batch) == {"video", "caption", "key", "meta"}
        assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["video"].dtype == torch.float32
        assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0 and batch["video"].std() > 0.05
        for caption, meta in zip(batch["caption"], batch["meta"]):
            assert caption.startswith("caption of train")
            assert meta["source"] == caption.removeprefix("caption of ")
            assert (
                meta["shard"].endswith(".tar") and meta["orig_size"] == [32, 32] and meta["num_frames"] == 12
            )
            assert meta["fps"] == pytest.approx(4.0) and len(meta["frame_indices"]) == 4
            assert meta["frame_indices"][1] - meta["frame_indices"][0] == 2 and meta["pad"] is False


@pytest.mark.parametrize(
    "split", ["train", "val"]
)  # 5 shards (split by shard) and 2 shards (split by sample)
def test_exact_mode_every_sample_once_across_ranks_and_workers(corpus: Path, split: str) -> None:
    counts = shard_sample_counts(expand_shards(str(corpus / f"{split}-*.tar")))
    per_rank = []
    for rank in range(2):
        dataset = make(str(corpus / f"{split}-*.tar"), rank=rank, world_size=2, shard_counts=counts)
        per_rank.append(run(dataset, workers=2))
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    seen = Counter(keys_of(per_rank[0]) + keys_of(per_rank[1]))
    assert sorted(seen) == sorted(all_keys(corpus, split)) and set(seen.values()) == {1}
    for batches in per_rank:
        assert all(b["video"].shape[0] == 2 for b in batches)
        assert set(keys_of(batches, with_pad=True)) >= set(keys_of(batches))


def test_exact_mode_uses_env_rank(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        got += keys_of(run(make(str(corpus / "val-*.tar"), shard_counts=[4, 3])))
    assert sorted(got) == sorted(all_keys(corpus, "val"))


def test_exact_mode_single_rank_no_padding_and_cap(corpus: Path) -> None:
    batches = run(make(str(corpus / "train-*.tar")), workers=2)
    assert sorted(keys_of(batches, with_pad=True)) == sorted(all_keys(corpus, "train"))
    capped = run(make(str(corpus / "train-*.tar"), batches_per_epoch=20), workers=2)
    assert len(capped) == 20 and sum(m["pad"] for b in capped for m in b["meta"]) == 40 - 15


@pytest.mark.parametrize("resampled", [True, False])
def test_uneven_shards_equal_batches_per_rank(tmp_path: Path, resampled: bool) -> None:
    simple_corpus(tmp_path, [7, 1])
    lengths = []
    for rank in range(2):
        dataset = make(
            str(tmp_path / "train-*.tar"),
            mode="train",
            batches_per_epoch=5,
            resampled=resampled,
            shuffle_buffer=3,
            rank=rank,
            world_size=2,
            clip=ClipSpec(4),
        )
        lengths.append(len(run(dataset, workers=2)))
    assert lengths == [5, 5]


def test_corrupt_samples_skipped_and_counted(tmp_path: Path) -> None:
    good = [video_item(f"g{i}") for i in range(5)]
    bad = [
        corrupt_item("zeros"),
        corrupt_item("short", data=b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 50),
        video_item("tiny", frames=2),
    ]
    write_corpus(tmp_path, {"train": [good[:2] + bad[:2], good[2:] + bad[2:]]})
    dataset = make(str(tmp_path / "train-*.tar"), max_skip_rate=0.5, skip_check_after=1)
    batches = run(dataset, workers=2)
    assert sorted(keys_of(batches)) == sorted(i.key for i in good)
    assert dataset.skip_counters.summary() == {
        "seen": 8, "ok": 5, "skipped": 3, "rate": 3 / 8, "reasons": {"DecodeError": 2, "ClipTooShortError": 1}
    }


def test_broken_tar_counted_as_skip(tmp_path: Path) -> None:
    simple_corpus(tmp_path, [3, 3])
    data = (tmp_path / "train-000001.tar").read_bytes()
    (tmp_path / "train-000001.tar").write_bytes(data[: len(data) // 2])
    dataset = make(str(tmp_path / "train-*.tar"), batch_size=1, max_skip_rate=1.0)
    keys = keys_of(run(dataset))
    assert 3 <= len(keys) < 6 and dataset.skip_counters.summary()["skipped"] == 1
    # the cut tar ends in a sample missing its media member
    assert dataset.skip_counters.summary()["reasons"] == {"SampleError": 1}
    (tmp_path / "train-000002.tar").write_bytes(b"not a tar archive" * 64)
    dataset = make(str(tmp_path / "train-*.tar"), batch_size=1, max_skip_rate=1.0)
    assert keys_of(run(dataset, workers=2)) and dataset.skip_counters.summary()["reasons"] == {
        "SampleError": 1, "shard": 1
    }


def test_skip_rate_abort(tmp_path: Path) -> None:
    items = [video_item("ok0"), *(corrupt_item(f"bad{i}") for i in range(6)), video_item("ok1")]
    write_corpus(tmp_path, {"train": [items]})
    dataset = make(
        str(tmp_path / "train-*.tar"),
        mode="train",
        batches_per_epoch=4,
        max_skip_rate=0.2,
        skip_check_after=4,
        resampled=False,
    )
    with pytest.raises(SkipRateError) as info:
        run(dataset)
    message = str(info.value)
    assert "max_skip_rate=20.0%" in message and "skipped 3 of 4" in message
    assert corrupt_item("bad2").key in message and "train-000000.tar" in message and "DecodeError" in message
    with pytest.raises(SkipRateError, match="max_skip_rate"):
        run(
            make(
                str(tmp_path / "train-*.tar"),
                mode="train",
                batches_per_epoch=4,
                max_skip_rate=0.2,
                skip_check_after=4,
            ),
            workers=1,
        )


def test_seeded_shuffle_reproducible_and_changes_with_epoch(corpus: Path) -> None:
    def order(seed: int, epoch: int, workers: int = 2) -> list[str]:
        ds = make(
            str(corpus / "train-*.tar"),
            mode="train",
            batches_per_epoch=6,
            shuffle_buffer=5,
            seed=seed,
            resampled=False,
            clip=ClipSpec(4),
        )
        return keys_of(run(ds, workers=workers, epoch=epoch))

    first = order(0, 0)
    assert first == order(0, 0)
    assert first != order(0, 1) and first != order(1, 0)
    clip_a = make(str(corpus / "train-*.tar"), mode="train", batches_per_epoch=2, clip=ClipSpec(4))
    starts = lambda ds: [m["frame_indices"][0] for b in run(ds) for m in b["meta"]]  # noqa: E731
    assert starts(clip_a) == starts(clip_a)


def test_persistent_workers_follow_epoch(corpus: Path) -> None:
    ds = make(
        str(corpus / "train-*.tar"), mode="train", batches_per_epoch=4, shuffle_buffer=5, resampled=False
    )
    epoch = {"value": 0}
    loader = VideoLoader(ds, num_workers=2, persistent_workers=True, epoch_fn=lambda: epoch["value"])
    first = keys_of(list(loader))
    epoch["value"] = 1
    second = keys_of(list(loader))
    fresh = make(
        str(corpus / "train-*.tar"), mode="train", batches_per_epoch=4, shuffle_buffer=5, resampled=False
    )
    assert second != first and second == keys_of(run(fresh, workers=2, epoch=1))


def test_brace_glob_and_pipe_specs_agree(corpus: Path) -> None:
    names = [f"train-{i:06d}.tar" for i in range(5)]
    by_glob = keys_of(run(make(str(corpus / "train-*.tar"))))
    by_brace = keys_of(run(make(str(corpus / "train-{000000..000004}.tar"))))
    by_pipe = keys_of(run(make([f"pipe:cat {corpus / n}" for n in names])))
    by_pipe_brace = keys_of(run(make(f"pipe:cat {corpus}/train-{{000000..000004}}.tar")))
    assert by_glob == by_brace == by_pipe == by_pipe_brace and len(by_glob) == 15
    # stopping mid-shard closes the pipe without error
    assert len(run(make(f"pipe:cat {corpus}/train-000004.tar", mode="train", batches_per_epoch=1))) == 1


def test_exact_mode_multi_rank_needs_counts_for_pipes(corpus: Path) -> None:
    dataset = make(f"pipe:cat {corpus}/val-000000.tar", rank=0, world_size=2)
    with pytest.raises(ValueError, match="sample counts"):
        run(dataset)


def test_uint8_batches_convert_to_the_float_batch(corpus: Path) -> None:
    as_float = run(make(str(corpus / "train-*.tar"), mode="train", batches_per_epoch=2), workers=1)
    as_uint8 = run(
        make(str(corpus / "train-*.tar"), mode="train", batches_per_epoch=2, video_dtype="uint8"), workers=1
    )
    for f, u in zip(as_float, as_uint8):
        assert u["video"].dtype == torch.uint8 and u["key"] == f["key"]
        assert torch.equal(batch_to_float(u)["video"], f["video"])
    assert batch_to_float(as_float[0]) is as_float[0]


def test_decode_clip_gives_the_contract_sample(corpus: Path) -> None:
    raw = next(iter_shard(str(corpus / "train-000000.tar")))
    clip = decode_clip(raw, ClipSpec(4, start="center"), BUCKET, rng=np.random.default_rng(0))
    sample = clip.as_sample()
    assert set(sample) == {"video", "caption", "key", "meta"} and sample["key"] == raw["__key__"]
    assert sample["video"].shape == (3, 4, 16, 16) and sample["video"].dtype == torch.float32
    assert sample["meta"]["frame_indices"] == [4, 5, 6, 7] and sample["meta"]["shard"].endswith(
        "train-000000.tar"
    )
