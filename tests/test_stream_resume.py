"""Exact mid-epoch resume of the training stream: the batches after a restore equal the uninterrupted ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.shards import corrupt_item, video_item, write_corpus
from vdm.data.buckets import Bucket
from vdm.data.clips import ClipSpec
from vdm.data.loader import DataResumeError, VideoLoader
from vdm.data.pipeline import VideoDataset
from vdm.data.shards import iter_shard

BUCKETS = [Bucket(16, 16, 4), Bucket(16, 24, 4)]
BATCHES = 7


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume_corpus")
    counter = iter(range(1000))

    def item(wide: bool) -> Any:
        n = next(counter)
        return video_item(f"v{n}", 10, 32, 48 if wide else 32, seed=n)

    shards = [[item(j % 3 == 0) for j in range(size)] for size in (4, 2, 5, 3)]
    shards[2].insert(2, corrupt_item("broken"))
    write_corpus(root, {"train": shards})
    return root


class Run:
    """A loader over the corpus with an epoch counter driven by the test."""

    def __init__(self, corpus: Path, workers: int, resampled: bool, **kwargs: Any) -> None:
        self.epoch = 0
        dataset = VideoDataset(
            str(corpus / "train-*.tar"),
            ClipSpec(4, start="random", crop="random"),
            buckets=BUCKETS,
            batch_size=2,
            batches_per_epoch=BATCHES,
            shuffle_buffer=5,
            seed=3,
            resampled=resampled,
            rank=0,
            world_size=1,
            max_skip_rate=0.5,
        )
        self.loader = VideoLoader(dataset, num_workers=workers, epoch_fn=lambda: self.epoch, **kwargs)

    def batches(self, epoch: int, limit: int | None = None) -> list[dict[str, Any]]:
        self.epoch, out = epoch, []
        if limit == 0:
            iter(self.loader)
            return out
        for batch in self.loader:
            out.append(batch)
            if limit is not None and len(out) == limit:
                break
        return out


def same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x["key"] == y["key"] and torch.equal(x["video"], y["video"]) for x, y in zip(a, b)
    )


def test_iter_shard_skip_seeks_to_the_sample(corpus: Path) -> None:
    url = str(corpus / "train-000002.tar")
    keys = [s["__key__"] for s in iter_shard(url)]
    assert len(keys) == 6
    for skip in range(len(keys) + 2):
        assert [s["__key__"] for s in iter_shard(url, skip=skip)] == keys[skip:]


@pytest.mark.parametrize(
    ("workers", "resampled", "cut"),
    [(0, False, 0), (0, False, 3), (0, True, 5), (0, False, BATCHES),
     (2, False, 3), (2, True, 4), (2, False, 6)],
)
def test_resume_mid_epoch_equals_uninterrupted(corpus: Path, workers: int, resampled: bool, cut: int) -> None:
    reference = Run(corpus, workers, resampled)
    full = [reference.batches(0), reference.batches(1)]
    assert len(full[0]) == len(full[1]) == BATCHES
    assert not same(full[0], full[1])  # epochs are reshuffled

    first = Run(corpus, workers, resampled)
    head = first.batches(0, limit=cut)
    assert same(head, full[0][:cut])
    state = first.loader.state_dict()

    resumed = Run(corpus, workers, resampled)
    resumed.loader.load_state_dict(state)
    if cut == BATCHES:  # saved after the epoch's last batch: Lightning's next iter() is the next epoch's
        assert same(resumed.batches(0), full[1])
        return
    tail = resumed.batches(0)
    assert same(head + tail, full[0]), f"epoch 0 differs after resuming at batch {cut}"
    assert same(resumed.batches(1), full[1])


def test_changed_stream_configuration_is_refused(corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = Run(corpus, 2, False)
    first.batches(0, limit=3)
    state = first.loader.state_dict()
    with pytest.raises(DataResumeError, match=r"data.num_workers: 2 then, 1 now.*data.resume=epoch"):
        Run(corpus, 0, False).loader.load_state_dict(state)
    with pytest.raises(DataResumeError, match=r"data.resampled: False then, True now"):
        Run(corpus, 2, True).loader.load_state_dict(state)

    restart = Run(corpus, 0, False, resume="epoch")
    restart.loader.load_state_dict(state)
    assert "restarting the epoch's stream" in caplog.text
    assert same(restart.batches(0), Run(corpus, 0, False).batches(0))


def test_state_is_plain_data_that_loads_weights_only(corpus: Path, tmp_path: Path) -> None:
    run = Run(corpus, 2, True)
    run.batches(0, limit=2)
    torch.save({"loader": run.loader.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["loader"]
    resumed = Run(corpus, 2, True)
    resumed.loader.load_state_dict(state)
    assert len(resumed.batches(0)) == BATCHES - 2
