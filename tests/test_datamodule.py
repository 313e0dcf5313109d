"""VideoDataModule: hydra instantiation, contract batches, argument validation, epochs and state."""

from __future__ import annotations

import inspect
import json
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tests.helpers.config import config_option
from tests.helpers.shards import simple_corpus
from vdm.data.buckets import EmptyBucketError
from vdm.data.datamodule import VideoDataModule

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dm")
    simple_corpus(root, [6, 5], val_sizes=[3, 2])
    return root


def config(root: Path, **overrides: Any) -> dict[str, Any]:
    cfg = {
        "_target_": "vdm.data.datamodule.VideoDataModule",
        "train_shards": f"{root}/train-*.tar",
        "val_shards": f"{root}/val-{{000000..000001}}.tar",
        "manifest": f"{root}/manifest.json",
        "num_frames": 4,
        "frame_stride": 2,
        "target_fps": None,
        "height": 16,
        "width": 16,
        "batch_size": 2,
        "val_batch_size": 3,
        "num_workers": 2,
        "batches_per_epoch": None,
        "val_batches": None,
        "shuffle_buffer": 4,
        "seed": 1,
        "short_policy": "skip",
        "start": "random",
        "backend": "decord",
        "max_skip_rate": 0.05,
        "resampled": True,
        "buckets": None,
        "persistent_workers": False,
        "pin_memory": False,
    }
    cfg.update(overrides)
    return cfg


def keys(batches: list[dict[str, Any]]) -> list[str]:
    return [k for b in batches for k, m in zip(b["key"], b["meta"]) if not m["pad"]]


def test_instantiate_and_dataloaders(corpus: Path) -> None:
    dm = instantiate(OmegaConf.create(config(corpus)))
    assert isinstance(dm, VideoDataModule)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == len(dm.train_dataloader()) == 11 // 2  # derived from the manifest
    for batch in train:
        assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["video"].dtype == torch.float32
        assert isinstance(batch["caption"][0], str) and len(batch["key"]) == len(batch["meta"]) == 2
        assert {"source", "shard", "fps", "frame_indices", "orig_size", "num_frames"} <= set(batch["meta"][0])
    val = list(dm.val_dataloader())
    expected = [
        json.loads(x)["key"]
        for x in (corpus / "samples.jsonl").read_text().splitlines()
        if json.loads(x)["split"] == "val"
    ]
    assert Counter(keys(val)) == Counter(expected)
    assert all(m["frame_indices"] == [2, 4, 6, 8] for b in val for m in b["meta"])  # centred, no randomness
    assert dm.skip_summary()["train"]["ok"] >= 10 and dm.skip_summary()["val"]["skipped"] == 0


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_data_configs_match_constructor(name: str) -> None:
    cfg = config_option("data", name)
    node = cfg.data if "data" in cfg else cfg
    target = hydra.utils.get_class(node._target_)
    assert issubclass(target, VideoDataModule)
    accepted = set(inspect.signature(target.__init__).parameters) - {"self"}
    assert set(node) - {"_target_"} <= accepted, f"conf/data/{name}.yaml keys unknown to {target.__name__}"


def test_shards_yaml_instantiates(corpus: Path) -> None:
    cfg = OmegaConf.merge({"seed": 5}, config_option("data", "shards"))
    for group in [cfg, *(v for v in cfg.values() if isinstance(v, DictConfig))]:
        if "root" in group.keys() and OmegaConf.is_missing(group, "root"):
            group.root = str(corpus)
    data = cfg.data if "data" in cfg else cfg
    data.num_workers, data.height, data.width = 0, 16, 16
    data.num_frames, data.frame_stride, data.batch_size = 4, 1, 2
    dm = instantiate(data)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["video"].shape == (2, 3, 4, 16, 16) and dm.seed == 5


@pytest.mark.parametrize(
    "key,value",
    [
        ("batch_size", 0),
        ("num_frames", -1),
        ("height", 0),
        ("frame_stride", 0),
        ("num_workers", -1),
        ("short_policy", "drop"),
        ("start", "middle"),
        ("backend", "opencv"),
        ("max_skip_rate", 1.5),
        ("target_fps", 0),
        ("batches_per_epoch", 0),
        ("val_batches", 0),
        ("shuffle_buffer", -2),
        ("buckets", [[16, 16]]),
        ("train_shards", None),
        ("crop", "corner"),
        ("video_dtype", "float16"),
    ],
)
def test_argument_errors_name_the_key(corpus: Path, key: str, value: Any) -> None:
    with pytest.raises(InstantiationException, match=f"`{key}`") as info:
        instantiate(OmegaConf.create(config(corpus, **{key: value})))
    assert isinstance(info.value.__cause__, ValueError)


def test_missing_shards_and_empty_bucket(corpus: Path) -> None:
    dm = VideoDataModule(
        **{k: v for k, v in config(corpus, train_shards=f"{corpus}/nope-*.tar").items() if k != "_target_"}
    )
    with pytest.raises(FileNotFoundError, match="nope"):
        dm.setup("fit")
    dm = instantiate(OmegaConf.create(config(corpus, buckets=[[16, 16, 4], [16, 32, 4]])))
    with pytest.raises(EmptyBucketError, match="16x32x4"):
        dm.setup("fit")


def test_state_dict_and_epoch_seeding(corpus: Path) -> None:
    dm = instantiate(OmegaConf.create(config(corpus, batches_per_epoch=3, num_workers=0)))
    dm.setup("fit")
    epoch0 = keys(list(dm.train_dataloader()))
    dm.set_epoch(4)
    epoch4 = keys(list(dm.train_dataloader()))
    assert dm.state_dict() == {"epoch": 4, "seed": 1} and epoch4 != epoch0
    other = instantiate(OmegaConf.create(config(corpus, batches_per_epoch=3, num_workers=0)))
    other.load_state_dict({"epoch": 4, "seed": 1})
    other.setup("fit")
    assert keys(list(other.train_dataloader())) == epoch4


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[str]] = {}
        self.val_keys: list[str] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        video = batch["video"]
        assert (
            video.dtype == torch.float32 and -1.0 <= video.min() and video.max() <= 1.0 and video.std() > 0.05
        )
        self.seen.setdefault(self.current_epoch, []).extend(batch["key"])
        return (batch["video"].mean() * self.weight).sum() + self.weight.sum()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_keys += [k for k, m in zip(batch["key"], batch["meta"]) if not m["pad"]]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")  # exact by construction
def test_trainer_fit_uses_epochs(corpus: Path) -> None:
    dm = instantiate(
        OmegaConf.create(
            config(corpus, batches_per_epoch=3, num_workers=1, persistent_workers=True, video_dtype="uint8")
        )
    )  # converted to float by the datamodule hook
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert [len(model.seen[e]) for e in (0, 1)] == [6, 6] and model.seen[0] != model.seen[1]
    assert len(model.val_keys) == 2 * 5
    assert dm.state_dict()["epoch"] == 2


def test_root_fills_in_paths_and_val_is_optional(tmp_path: Path) -> None:
    simple_corpus(tmp_path, [3, 2])
    dm = VideoDataModule(root=str(tmp_path), num_frames=4, height=16, width=16, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert dm.manifest == f"{tmp_path}/manifest.json" and dm.val_dataloader() == []
    assert len(list(dm.train_dataloader())) == 5 // 2
