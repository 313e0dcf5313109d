"""End to end: train.py and evaluate.py on the tiny synthetic corpus through the real config tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from evaluate import evaluate
from tests.helpers.config import CONF_DIR
from train import train


def test_train_writes_config_checkpoints_and_metrics(tiny_train_cfg):
    cfg = tiny_train_cfg()
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)

    saved = OmegaConf.load(out / "config_resolved.yaml")
    assert saved.data.batch_size == 2 and "${" not in OmegaConf.to_yaml(saved)
    for key in ("train/loss", "val/loss", "val/psnr", "val/psnr_mean_frame", "val/psnr_moving",
                "val/psnr_mean_frame_moving"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key]))
    # the clips that move are where the mean frame is a poor prediction (here every validation clip moves)
    assert metrics["val/psnr_mean_frame_moving"] <= metrics["val/psnr_mean_frame"]

    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in ckpts} >= {"last.ckpt", "step0000004.ckpt", "step0000008.ckpt"}
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    assert ckpt["vdm_config"]["model"]["vae"]["_target_"] == "vdm.models.vae.VideoVAE"
    assert ckpt["vdm_config"]["data"]["num_frames"] == 5


def test_evaluate_reports_metrics_of_a_checkpoint(tiny_train_cfg, tmp_path):
    train_cfg = tiny_train_cfg("validate=false")
    train(train_cfg)
    ckpt = Path(train_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    # the checkpoint's stored model config wins over a different model= choice
    cfg = tiny_train_cfg(f"ckpt_path={ckpt}", "model.vae.base_channels=32", config_name="evaluate")
    metrics = evaluate(cfg)
    assert cfg.model.vae.base_channels == 16
    assert metrics["val/psnr"] > 0
    assert (Path(cfg.paths.output_dir) / "metrics.json").exists()


def test_resume_from_checkpoint_continues_the_step_count(tiny_train_cfg):
    first = tiny_train_cfg("trainer.max_steps=4", "validate=false")
    train(first)
    ckpt = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = tiny_train_cfg("trainer.max_steps=8", f"ckpt_path={ckpt}", "validate=false")
    train(resumed)
    last = torch.load(Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8


@pytest.mark.parametrize("experiment", [p.stem for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))])
def test_every_experiment_fast_dev_run(tiny_train_cfg, experiment, vae_export_dir):
    # a stage-2 experiment takes the VAE export it is given (in the pipeline: its stage-1 run's)
    stage2 = [f"model.vae_export={vae_export_dir}"] if "dit" in experiment else []
    cfg = tiny_train_cfg(f"experiment={experiment}", "trainer.fast_dev_run=true", *stage2)
    metrics = train(cfg)
    assert "train/loss" in metrics


def test_corrupt_samples_are_skipped_counted_and_logged(tiny_train_cfg, tmp_path):
    from tests.helpers.shards import corrupt_item, video_item, write_corpus

    good = [video_item(f"ok-{i}.mp4", frames=9, seed=i) for i in range(7)]
    write_corpus(tmp_path / "corpus", {"train": [good + [corrupt_item("bad.mp4")]], "val": [good[:2]]})
    cfg = tiny_train_cfg(
        "data=shards",
        f"corpus.root={tmp_path / 'corpus'}",
        "data.frame_stride=1",
        "callbacks.data_skips.every_n_steps=1",
        "data.max_skip_rate=0.5",
        "data.skip_check_after=1",
        "validate=false",
    )
    metrics = train(cfg)
    assert metrics["data/train_skipped"] >= 1
    assert 0 < metrics["data/train_skip_rate"] <= 0.5


def test_skip_rate_above_the_limit_stops_training(tiny_train_cfg, tmp_path):
    from tests.helpers.shards import corrupt_item, video_item, write_corpus

    items = [video_item("ok.mp4", frames=9)] + [corrupt_item(f"bad-{i}.mp4") for i in range(5)]
    write_corpus(tmp_path / "corpus", {"train": [items], "val": [items[:1]]})
    cfg = tiny_train_cfg(
        "data=shards",
        f"corpus.root={tmp_path / 'corpus'}",
        "data.frame_stride=1",
        "data.max_skip_rate=0.2",
        "data.skip_check_after=4",
        "validate=false",
    )
    with pytest.raises(Exception, match=r"skipped \d+ of \d+ samples .* exceeds max_skip_rate=20.0%"):
        train(cfg)


def diffusion_overrides(export: Path) -> list[str]:
    return [
        "stage=diffusion",
        f"model.vae_export={export}",
        "callbacks.diffusion_samples.every_n_steps=4",
        "callbacks.diffusion_samples.num_steps=2",
        "callbacks.diffusion_samples.num_prompts=2",
    ]


def test_diffusion_stage_trains_samples_and_resumes_with_its_ema(tiny_train_cfg, vae_export_dir):
    first = tiny_train_cfg(*diffusion_overrides(vae_export_dir), "trainer.max_steps=4")
    metrics = train(first)
    out = Path(first.paths.output_dir)
    for key in ("train/loss", "train/grad_norm", "val/loss", "val/loss_ema"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key]))
    assert len(list((out / "samples").glob("step0000004_*.mp4"))) == 2
    assert (out / "samples" / "step0000004.txt").read_text().count("\n") == 2
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert ckpt["vae_hash"] == (vae_export_dir / "export.json").read_text().split('"vae_hash": "')[1][:64]
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in state)
    assert int(state["ema.averaged.n_averaged"]) == 4

    ckpt_path = out / "checkpoints" / "last.ckpt"
    resumed = tiny_train_cfg(*diffusion_overrides(vae_export_dir), f"ckpt_path={ckpt_path}", "validate=false")
    train(resumed)
    last = torch.load(Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8
    assert int(last["state_dict"]["ema.averaged.n_averaged"]) == 8


def test_diffusion_on_precomputed_latents_and_text(tiny_train_cfg, vae_export_dir, synthetic_root, tmp_path):
    from data_prep.precompute_latents import precompute
    from data_prep.standin_text_encoder import ensure_random_text_encoder, synthetic_vocabulary
    from vdm.models.text_encoder import TextEncoder

    text_dir = ensure_random_text_encoder(
        tmp_path / "data" / "text_encoder_synthetic", vocab=synthetic_vocabulary(), max_length=32
    )
    latents = tmp_path / "latents"
    precompute(
        str(synthetic_root),
        str(vae_export_dir),
        str(latents),
        num_frames=5,
        height=32,
        width=32,
        text_encoder=TextEncoder(str(text_dir), "t5", max_length=32),
    )
    overrides = [
        *diffusion_overrides(vae_export_dir),
        "data=latents",
        f"latents.root={latents}",
        "data.batch_size=2",
        "data.val_batch_size=2",
        "data.num_workers=0",
        "data.batches_per_epoch=4",
        "data.val_batches=2",
        "data.num_frames=5",
        "data.height=32",
        "data.width=32",
        "trainer.max_steps=4",
        "callbacks.diffusion_samples.prompts=[a red star growing on a black background]",
    ]
    metrics = train(tiny_train_cfg(*overrides))
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))

    wrong = tiny_train_cfg(
        *overrides, "model.text_encoder.max_length=16", "synthetic_text_encoder=null",
        "model.dit.context_dim=64"
    )
    with pytest.raises(ValueError, match="text embeddings of text encoder t5:"):
        train(wrong)


def test_evaluate_stage2_checkpoint_writes_videos_metrics_and_report(
    tiny_train_cfg, vae_export_dir, clip_dir
):
    train_cfg = tiny_train_cfg(*diffusion_overrides(vae_export_dir), "trainer.max_steps=2", "validate=false")
    train(train_cfg)
    ckpt = Path(train_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    overrides = [
        *diffusion_overrides(vae_export_dir)[:2],
        f"ckpt_path={ckpt}",
        "generation.max_prompts=2",
        "generation.videos_per_prompt=2",
        "generation.num_steps=2",
        f"metrics.clip_path={clip_dir}",
    ]
    cfg = tiny_train_cfg(*overrides, config_name="evaluate")
    metrics = evaluate(cfg)
    out = Path(cfg.paths.output_dir)
    assert len(list((out / "videos").glob("p*_s*.mp4"))) == 4
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["clip_score"] == pytest.approx(metrics["clip_score"])
    assert -1 <= metrics["clipsim"] <= 1 and 0 <= metrics["clip_score"] <= 100
    protocol = saved["protocol"]
    assert protocol["num_videos"] == 4 and len(protocol["seeds"]) == 4 and protocol["ema"] is True
    assert protocol["checkpoint_sha256"] and protocol["vae_hash"] and protocol["num_steps"] == 2
    assert protocol["sampler"] == "euler" and protocol["checkpoint_format"] == "lightning"
    report = (out / "report.html").read_text()
    assert report.count("<video") == 4 and "data:video/mp4;base64," in report


def test_evaluate_stage2_fvd_caches_reference_statistics(tiny_train_cfg, vae_export_dir, tmp_path):
    from vdm.metrics.i3d import InceptionI3d

    train_cfg = tiny_train_cfg(*diffusion_overrides(vae_export_dir), "trainer.max_steps=1", "validate=false")
    train(train_cfg)
    i3d_path, reference = tmp_path / "i3d.pt", tmp_path / "cache" / "real_stats.pt"
    torch.manual_seed(0)
    torch.save(InceptionI3d().state_dict(), i3d_path)
    overrides = [
        *diffusion_overrides(vae_export_dir)[:2],
        f"ckpt_path={Path(train_cfg.paths.output_dir) / 'checkpoints' / 'last.ckpt'}",
        "data.num_frames=9",  # FVD needs >= 9 frames
        "generation.max_prompts=2",
        "generation.num_steps=1",
        f"metrics.i3d_path={i3d_path}",
        f"metrics.reference_stats={reference}",
    ]
    first = evaluate(tiny_train_cfg(*overrides, config_name="evaluate"))
    assert reference.exists() and first["fvd"] >= 0
    cached = reference.stat().st_mtime_ns
    again = evaluate(tiny_train_cfg(*overrides, config_name="evaluate"))  # kept videos, cached statistics
    assert reference.stat().st_mtime_ns == cached
    assert again["fvd"] == pytest.approx(first["fvd"], rel=1e-9)
    protocol = json.loads((tmp_path / "run" / "metrics.json").read_text())["protocol"]["fvd"]
    assert protocol["frames"] == 16 and protocol["resolution"] == 224
    assert protocol["reference_clips"] == 4  # data.val_batches=2 batches of 2


def test_training_hooks_log_clip_score_fvd_and_reconstruction_fvd(
    tiny_train_cfg, vae_export_dir, clip_dir, i3d_path, tmp_path
):
    hooks = [f"metrics.i3d_path={i3d_path}", "data.num_frames=9", "logger=csv", "trainer.max_steps=2"]
    stage2 = [
        *diffusion_overrides(vae_export_dir),
        *hooks,
        f"metrics.clip_path={clip_dir}",
        "callbacks.generation_metrics.every_n_steps=2",
        "callbacks.generation_metrics.num_prompts=2",
        "callbacks.generation_metrics.num_steps=1",
        "validate=false",
    ]
    cfg = tiny_train_cfg(*stage2)
    metrics = train(cfg)
    assert {"val/fvd", "val/clip_score", "val/clipsim"} <= metrics.keys()
    assert metrics["val/fvd"] > 0 and 0 <= metrics["val/clip_score"] <= 100
    assert Path(cfg.metrics.reference_stats).is_file()  # computed from the validation split, cached
    logged = next(Path(cfg.paths.output_dir).rglob("metrics.csv")).read_text()
    assert "val/fvd" in logged.splitlines()[0] and "val/clip_score" in logged.splitlines()[0]

    metrics = train(tiny_train_cfg(*hooks, "model.vae.base_channels=32"))  # stage 1
    assert metrics["val/rfvd"] > 0


def test_metric_weights_are_checked_before_training(tiny_train_cfg, tmp_path):
    from vdm.config.check import ConfigError

    with pytest.raises(ConfigError, match="metrics.i3d_path: .*missing.pt does not exist"):
        train(tiny_train_cfg(f"metrics.i3d_path={tmp_path / 'missing.pt'}"))
    (tmp_path / "i3d.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="data.num_frames: 5, but FVD"):
        train(tiny_train_cfg(f"metrics.i3d_path={tmp_path / 'i3d.pt'}"))
