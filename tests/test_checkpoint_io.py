"""Atomic checkpoint writes: a save killed midway leaves the previous checkpoint intact and loadable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vdm.lightning.checkpoint_io import AtomicCheckpointIO
from vdm.utils.resume import checkpoint_complete, find_resume_checkpoint
from vdm.utils.runtime import apply_auto_precision


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1

    real_save = torch.save

    def killed(obj, f, *args, **kwargs):  # writes half of the bytes, then the process "dies"
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2), "big": torch.zeros(10_000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1  # untouched
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    assert checkpoint_complete(path) and find_resume_checkpoint(tmp_path) == path

    # SIGKILL cannot clean up: the next save of the same name removes the dead process' temporary file
    stale = path.with_name(".last.ckpt.99999-0badf00d.tmp")
    stale.write_bytes(b"half a checkpoint")
    (path.parent / ".step0000001.ckpt.99999-0badf00d.tmp").write_bytes(b"another name's")
    assert find_resume_checkpoint(tmp_path) == path
    io.save_checkpoint({"step": torch.tensor(3)}, path)
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == [".step0000001.ckpt.99999-0badf00d.tmp", "last.ckpt"]
    assert torch.load(path, weights_only=True)["step"] == 3


def test_the_trainer_configs_use_it(tiny_train_cfg) -> None:
    import hydra

    cfg = tiny_train_cfg()
    apply_auto_precision(cfg)  # trainer.precision=auto: train.py resolves it for this machine first
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
