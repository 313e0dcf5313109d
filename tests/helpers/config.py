"""Hydra composition of the real config tree and the tiny corpus and run sizes the tests share."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Small enough to generate in seconds; shape-compatible with the tiny VAE (1 + 4k frames, 8x spatial).
TINY_SYNTHETIC = {
    "num_train": 24,
    "num_val": 8,
    "num_frames": 9,
    "height": 32,
    "width": 32,
    "fps": 8,
    "keyframe_interval": 4,
}
TINY_RUN = [
    "data.num_frames=5",
    "data.height=32",
    "data.width=32",
    "data.batch_size=2",
    "data.val_batch_size=2",
    "data.num_workers=0",
    "data.batches_per_epoch=4",
    "data.val_batches=2",
    "logger=none",
    "trainer.max_steps=8",
    # fp32: exact numbers on any CPU (the CPU trainer's bf16 default depends on native bf16 support)
    "trainer.precision=32-true",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
    "module.warmup_steps=2",
]
# tests share run directories between runs: no automatic resume unless a test asks for it
TINY_CALLBACKS = [
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.progress_bar.refresh_rate=0",
    "ckpt_path=null",
]


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as ``@hydra.main`` would, with the run dir at ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    GlobalHydra.instance().clear()
    return cfg


def config_option(group: str, option: str) -> DictConfig:
    """One option of a config group composed as Hydra composes it (with the defaults it includes, e.g.
    ``model/base/dit.yaml``), without its group's package prefix: ``config_option("model", "dit_b").dit``.
    ``# @package _global_`` options (data) come back with their global keys (``.data``, ``.synthetic``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=f"{group}/{option}")
    return cfg[group] if group in cfg and len(cfg) == 1 else cfg
