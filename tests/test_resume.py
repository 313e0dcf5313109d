"""Automatic resume: the newest complete checkpoint of the run directory, incomplete ones skipped."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from train import train
from vdm.utils.resume import checkpoint_complete, find_resume_checkpoint


def _save(path: Path, value: int, mtime: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"value": torch.tensor(value)}, path)
    os.utime(path, ns=(mtime, mtime))
    return path


def test_newest_complete_checkpoint_wins_and_truncated_ones_are_skipped(tmp_path: Path) -> None:
    assert find_resume_checkpoint(tmp_path) is None
    old = _save(tmp_path / "checkpoints" / "step0000100.ckpt", 100, 1_000_000_000)
    new = _save(tmp_path / "checkpoints" / "step0000200.ckpt", 200, 2_000_000_000)
    assert find_resume_checkpoint(tmp_path) == new
    data = new.read_bytes()
    new.write_bytes(data[: len(data) // 2])  # killed while writing
    os.utime(new, ns=(3_000_000_000, 3_000_000_000))
    assert not checkpoint_complete(new) and find_resume_checkpoint(tmp_path) == old
    hpc = _save(tmp_path / "hpc_ckpt_1.ckpt", 300, 4_000_000_000)  # Lightning's SLURM preemption save
    assert find_resume_checkpoint(tmp_path) == hpc


def test_deepspeed_directory_complete_only_with_its_tag(tmp_path: Path) -> None:
    ds = tmp_path / "checkpoints" / "last.ckpt"
    _save(ds / "checkpoint" / "mp_rank_00_model_states.pt", 1, 1_000_000_000)
    assert not checkpoint_complete(ds)  # no `latest` yet: the save did not finish
    (ds / "latest").write_text("checkpoint")
    assert checkpoint_complete(ds) and find_resume_checkpoint(tmp_path) == ds
    (ds / "latest").write_text("global_step9")
    assert not checkpoint_complete(ds)


def test_same_command_again_resumes_automatically(tiny_train_cfg, caplog) -> None:
    overrides = ["ckpt_path=auto", "validate=false", "callbacks.vae_export=null"]
    first = tiny_train_cfg(*overrides, "trainer.max_steps=4")
    with caplog.at_level(logging.INFO, logger="vdm"):  # vdm.train and the run setup (vdm.lightning.run)
        train(first)
        assert "resuming from" not in caplog.text  # a new run directory: nothing to resume
        train(tiny_train_cfg(*overrides, "trainer.max_steps=8"))
    out = Path(first.paths.output_dir)
    assert f"resuming from {out / 'checkpoints'}" in caplog.text
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 8


def test_an_explicit_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from vdm.lightning.run import resume_path

    run = tmp_path / "run"
    good = _save(run / "checkpoints" / "step0000100.ckpt", 100, 1_000_000_000)
    bad = _save(run / "checkpoints" / "step0000200.ckpt", 200, 2_000_000_000)
    bad.write_bytes(bad.read_bytes()[:100])
    cfg = OmegaConf.create({"ckpt_path": str(bad), "paths": {"output_dir": str(run)}})
    expected = rf"{bad} is incomplete .* the newest complete one there is {good}"
    with pytest.raises(RuntimeError, match=expected):
        resume_path(cfg)
    cfg.ckpt_path = "auto"
    assert resume_path(cfg) == str(good)  # auto falls back to it
    cfg.ckpt_path = str(good)
    assert resume_path(cfg) == str(good)
