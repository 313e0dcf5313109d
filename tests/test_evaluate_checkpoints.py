"""evaluate.py reads every checkpoint format: a DeepSpeed ZeRO directory and its safetensors export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluate import evaluate
from tests.helpers.config import TINY_CALLBACKS, TINY_RUN, TINY_SYNTHETIC
from vdm.utils.checkpoints import main as export_main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_evaluate_deepspeed_directory_and_its_safetensors_export(
    tiny_train_cfg, synthetic_root, vae_export_dir, clip_dir, tmp_path
):
    corpus = [f"synthetic.root={synthetic_root}"] + [f"synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()]
    run_dir = tmp_path / "ds_run"
    command = [
        sys.executable,
        "train.py",
        f"paths.root_dir={tmp_path}",
        *corpus,
        *TINY_RUN,
        *TINY_CALLBACKS,
        "stage=diffusion",
        f"model.vae_export={vae_export_dir}",
        "trainer.max_steps=2",
        "validate=false",
        "strategy=deepspeed_stage_2",
        "trainer.strategy._target_=vdm.lightning.strategies.CPUDeepSpeedStrategy",
        "callbacks.diffusion_samples.every_n_steps=100",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ds_dir = run_dir / "checkpoints" / "last.ckpt"
    assert (ds_dir / "latest").is_file()  # a ZeRO checkpoint directory, not a file

    overrides = [
        "stage=diffusion",
        f"model.vae_export={vae_export_dir}",
        "generation.max_prompts=2",
        "generation.videos_per_prompt=2",
        "generation.batch_size=2",
        "generation.num_steps=2",
        f"metrics.clip_path={clip_dir}",
    ]
    first = evaluate(tiny_train_cfg(*overrides, f"ckpt_path={ds_dir}", config_name="evaluate"))
    out = tmp_path / "run"
    saved = json.loads((out / "metrics.json").read_text())["protocol"]
    assert saved["checkpoint_format"] == "deepspeed" and saved["global_step"] == 2
    videos = {p.name: p.read_bytes() for p in (out / "videos").glob("*.mp4")}
    assert len(videos) == 4

    export = tmp_path / "model.safetensors"
    export_main([str(ds_dir), str(export)])
    for path in (out / "videos").glob("*.mp4"):
        path.unlink()  # regenerate every video from the export's weights
    again = evaluate(tiny_train_cfg(*overrides, f"ckpt_path={export}", config_name="evaluate"))
    assert json.loads((out / "metrics.json").read_text())["protocol"]["checkpoint_format"] == "safetensors"
    assert {p.name: p.read_bytes() for p in (out / "videos").glob("*.mp4")} == videos
    assert again["clip_score"] == pytest.approx(first["clip_score"], rel=1e-9)


def test_a_stage1_checkpoint_of_the_flat_model_layout_still_evaluates(tmp_path: Path) -> None:
    """Stage-1 configs stored before ``model.vae`` held the VAE node at ``model`` itself."""
    from omegaconf import OmegaConf

    from evaluate import use_checkpoint_config

    cfg = OmegaConf.create({"model": None, "module": None})
    stored = {"model": {"_target_": "vdm.models.vae.VideoVAE", "latent_channels": 16}, "module": {"x": 1}}
    use_checkpoint_config(cfg, stored, [], tmp_path / "old.ckpt")
    assert cfg.model.vae._target_ == "vdm.models.vae.VideoVAE" and cfg.model.vae.latent_channels == 16
    assert stored["model"]["_target_"] == "vdm.models.vae.VideoVAE"  # the caller's dict is left as it was
