"""NaN/Inf in a training step: stop before the update (naming the samples), or skip the update."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.modules import (
    ClipData,
    WeightSnapshots,
    clips,
    latent_batches,
    make_diffusion_module,
    make_vae_module,
)
from vdm.lightning.nonfinite import NonFiniteError


def _fit(module, tmp_path: Path, bad_step: int) -> tuple[L.Trainer, WeightSnapshots]:
    snapshots = WeightSnapshots()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                                      filename="step{step}", auto_insert_metric_name=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        callbacks=[snapshots, checkpoints], num_sanity_val_steps=0, limit_val_batches=0)
    # batch_size=None: every item is already a batch
    batches = torch.utils.data.DataLoader(latent_batches(bad_step), batch_size=None)
    trainer.fit(module, train_dataloaders=batches)
    return trainer, snapshots


def test_stop_raises_before_the_update_and_names_the_samples(vae_export_dir, text_encoder_dir, tmp_path):
    module = make_diffusion_module(vae_export_dir, text_encoder_dir)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 2; batch samples: ok-2, bad-2"):
        _fit(module, tmp_path, bad_step=2)
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert saved == ["step1.ckpt", "step2.ckpt"]  # nothing of the poisoned step
    assert all(torch.isfinite(p).all() for p in module.dit.parameters())


def test_skip_leaves_the_weights_of_the_bad_step_unchanged(vae_export_dir, text_encoder_dir, tmp_path,
                                                            caplog):
    module = make_diffusion_module(vae_export_dir, text_encoder_dir, nonfinite="skip")
    trainer, snapshots = _fit(module, tmp_path, bad_step=2)
    assert trainer.global_step == 4 and "bad-2" in caplog.text
    w = snapshots.weights
    assert torch.equal(w[2], w[1]) and not torch.equal(w[1], w[0]) and not torch.equal(w[3], w[2])
    assert torch.isfinite(w[3]).all()


def test_unknown_policy_is_refused(vae_export_dir, text_encoder_dir):
    with pytest.raises(ValueError, match="module.nonfinite must be one of stop, skip"):
        make_diffusion_module(vae_export_dir, text_encoder_dir, nonfinite="ignore")


def test_stage_one_stops_or_skips_a_nan_batch(tmp_path):
    videos = clips()
    videos[0, 0, 0, 0, 0] = float("nan")
    data = ClipData(videos, 2)
    trainer_args = dict(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0)
    with pytest.raises(NonFiniteError, match="non-finite generator loss at step 0"):
        L.Trainer(**trainer_args).fit(make_vae_module(), datamodule=data)
    module = make_vae_module(nonfinite="skip")
    before = [p.detach().clone() for p in module.model.parameters()]
    L.Trainer(**trainer_args).fit(module, datamodule=data)
    assert all(torch.equal(a, b) for a, b in zip(before, module.model.parameters()))  # every step skipped
