"""Evaluate a checkpoint on held-out data: ``python evaluate.py ckpt_path=PATH [overrides...]``.

Stage 1 (VAE): validation loss and per-frame PSNR on the validation split, written to ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from train import instantiate_module, instantiate_trainer, prepare_corpus
from vdm.utils.config_check import ConfigError, validate_config
from vdm.utils.runtime import configure_torch, resolved_config, save_resolved_config

log = logging.getLogger("vdm.evaluate")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Load ``cfg.ckpt_path`` into the configured stage and run the validation loop; returns its metrics."""
    validate_config(cfg)
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.exists():
        raise ConfigError(f"ckpt_path: no such checkpoint: {ckpt}")
    save_resolved_config(resolved_config(cfg), cfg.paths.output_dir)
    configure_torch(cfg.float32_matmul_precision)

    import lightning as L

    L.seed_everything(cfg.seed, workers=True)
    prepare_corpus(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = instantiate_module(cfg)
    trainer = instantiate_trainer(cfg)
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=str(ckpt), verbose=True)
    metrics = {k: float(v) for k, v in results[0].items()}
    out = Path(cfg.paths.output_dir) / "metrics.json"
    out.write_text(json.dumps({"checkpoint": str(ckpt.resolve()), "metrics": metrics}, indent=2))
    log.info("metrics written to %s: %s", out, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
