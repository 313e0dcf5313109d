"""Train a vdm stage: ``python train.py [stage=vae] [overrides...]`` (see README)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from data_prep.prepare import prepare_corpus
from vdm.lightning.run import resume_path, setup_run
from vdm.utils.runtime import save_run_metrics, scalar_metrics

log = logging.getLogger("vdm.train")


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate, build and fit; returns the final metrics (validation metrics when ``validate``)."""
    datamodule, module, trainer = setup_run(cfg, prepare=prepare_corpus)
    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg), weights_only=True)
    metrics = scalar_metrics(trainer.callback_metrics)
    if cfg.validate and not trainer.fast_dev_run:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in results[0].items()})
    log.info("final metrics: %s", metrics)
    save_run_metrics(metrics, cfg.paths.output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
