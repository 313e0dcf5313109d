"""Stage-1 training behaviour: both optimizers update, loss falls, LPIPS stays out of checkpoints, export."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.modules import ClipData, clips, make_vae_module
from vdm.lightning.callbacks import VAEExportCallback
from vdm.lightning.vae_module import VAEModule
from vdm.models.lpips import LPIPS
from vdm.utils.vae_export import ExportError, load_vae_export


def fit(module: VAEModule, steps: int, tmp_path: Path, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
                        enable_checkpointing=False, num_sanity_val_steps=0, check_val_every_n_epoch=1000)
    trainer.fit(module, datamodule=ClipData(clips(), steps))
    return trainer


def test_generator_and_discriminator_both_update(tmp_path):
    module = make_vae_module()
    before_g = copy.deepcopy(module.model.state_dict())
    before_d = copy.deepcopy(module.discriminator.state_dict())
    trainer = fit(module, 3, tmp_path)
    assert trainer.global_step == 3, "global_step counts generator steps"
    changed = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert changed(before_g, module.model.state_dict())
    assert changed(before_d, module.discriminator.state_dict())
    assert "train/d_loss" in trainer.callback_metrics and "train/gan_weight" in trainer.callback_metrics


def test_discriminator_waits_for_its_start_step(tmp_path):
    module = make_vae_module(disc_start_step=10)
    before_d = copy.deepcopy(module.discriminator.state_dict())
    trainer = fit(module, 3, tmp_path)
    assert all(torch.equal(v, module.discriminator.state_dict()[k]) for k, v in before_d.items())
    assert "train/d_loss" not in trainer.callback_metrics


def test_discriminator_schedule_starts_with_its_first_step(tmp_path):
    module = make_vae_module(disc_start_step=3, warmup_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        trainer = fit(module, 5, tmp_path)
    generator, discriminator = (config.scheduler for config in trainer.lr_scheduler_configs)
    assert generator.last_epoch == 5 and discriminator.last_epoch == 2
    # the discriminator is two steps into its own linear warmup (from 1/5 to 1 over 4 steps)
    assert discriminator.get_last_lr()[0] == pytest.approx(1e-3 * (1 / 5 + 2 * (4 / 5) / 4))


def test_short_run_reduces_reconstruction_loss(tmp_path):
    module = make_vae_module(discriminator=None, disc_optimizer=None)
    x = clips()
    with torch.no_grad():
        start = (module.model(x, sample_posterior=False)[0] - x).abs().mean()
    fit(module, 40, tmp_path)
    with torch.no_grad():
        end = (module.model(x, sample_posterior=False)[0] - x).abs().mean()
    assert end < 0.6 * start, (float(start), float(end))


def test_lpips_is_used_but_not_stored_in_checkpoints(tmp_path):
    module = make_vae_module(perceptual=LPIPS())
    trainer = fit(module, 2, tmp_path)
    assert trainer.callback_metrics["train/lpips"] > 0
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not any(k.startswith("perceptual.") for k in state)
    assert any(k.startswith("discriminator.") for k in state)
    restored = make_vae_module(perceptual=LPIPS())
    restored.on_load_checkpoint(ckpt := torch.load(path, weights_only=True))
    restored.load_state_dict(ckpt["state_dict"], strict=True)


@pytest.mark.gpu
def test_fp16_with_discriminator_is_refused(tmp_path):
    # on CPU Lightning turns 16-mixed into bf16-mixed, so only a GPU can exercise this
    module = make_vae_module()
    trainer = L.Trainer(max_steps=1, accelerator="gpu", devices=1, precision="16-mixed", logger=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="bf16-mixed or 32-true"):
        trainer.fit(module, datamodule=ClipData(clips(), 1))


def test_export_then_load_reproduces_latents(tmp_path):
    module = make_vae_module(discriminator=None, disc_optimizer=None)
    export_dir = tmp_path / "export"
    fit(module, 2, tmp_path, callbacks=[VAEExportCallback(str(export_dir), num_clips=4)])
    loaded = load_vae_export(export_dir)
    x = clips(2, seed=5)
    module.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model.encode(x).mode(), module.model.encode(x).mode())
    assert len(loaded.stats.mean) == 4 and loaded.stats.num_clips == 4
    assert all(s > 0 for s in loaded.stats.std)
    with torch.no_grad():
        z = module.model.encode(clips()).mode().double()
    torch.testing.assert_close(torch.tensor(loaded.stats.mean, dtype=torch.float64),
                               z.mean(dim=(0, 2, 3, 4)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(loaded.stats.std, dtype=torch.float64),
                               z.transpose(0, 1).flatten(1).std(dim=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ExportError, match="expected"):
        load_vae_export(export_dir, expected_hash="0" * 64)
    stats_file = export_dir / "latent_stats.json"
    stats_file.write_text(stats_file.read_text().replace("4", "5", 1))
    with pytest.raises(ExportError, match="was modified"):
        load_vae_export(export_dir)
