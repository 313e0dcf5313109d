"""Train a vdm stage: ``python train.py [stage=vae] [overrides...]`` (see README)."""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig

from vdm.utils.config_check import validate_config
from vdm.utils.runtime import (
    configure_torch,
    resolved_config,
    save_resolved_config,
    save_run_metrics,
    scalar_metrics,
)

log = logging.getLogger("vdm.train")


def prepare_corpus(cfg: DictConfig) -> None:
    """Generate the built-in synthetic corpus (and its stand-in text encoder) on first use; no-op when
    they exist or a real corpus / text encoder is configured."""
    if cfg.get("synthetic") is not None:
        from data_prep.synthetic import ensure_synthetic_corpus

        ensure_synthetic_corpus(**cfg.synthetic)
    if cfg.get("synthetic_text_encoder") is not None:
        from data_prep.text_encoder import ensure_random_text_encoder, synthetic_vocabulary

        ensure_random_text_encoder(**cfg.synthetic_text_encoder, vocab=synthetic_vocabulary())


def instantiate_trainer(cfg: DictConfig) -> Any:
    """Trainer with the configured callbacks and loggers."""
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def instantiate_models(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.model`` as module arguments: ``{"model": obj}`` for one ``_target_`` (stage 1), else one
    object per ``_target_`` child (stage 2: ``dit``, ``text_encoder``); plain values stay in the YAML."""
    if "_target_" in cfg.model:
        return {"model": hydra.utils.instantiate(cfg.model)}
    children = {k: v for k, v in cfg.model.items() if isinstance(v, DictConfig) and "_target_" in v}
    return {k: hydra.utils.instantiate(v) for k, v in children.items()}


def instantiate_module(cfg: DictConfig) -> Any:
    """The stage's LightningModule around freshly built models, carrying the resolved run config."""
    models = instantiate_models(cfg)
    optimizer = hydra.utils.instantiate(cfg.optimizer)
    module = hydra.utils.instantiate(cfg.module, **models, optimizer=optimizer)
    module.run_config = resolved_config(cfg)  # plain dict, stored in every checkpoint
    return module


def setup_run(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """Validate the config (before anything heavy), record it, seed, then build data, module and trainer."""
    validate_config(cfg)
    save_resolved_config(resolved_config(cfg), cfg.paths.output_dir)
    configure_torch(cfg.float32_matmul_precision)

    import lightning as L

    L.seed_everything(cfg.seed, workers=True)
    prepare_corpus(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    return datamodule, instantiate_module(cfg), instantiate_trainer(cfg)


def resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``, with ``auto`` resolved to the newest complete checkpoint of the run directory."""
    ckpt = cfg.get("ckpt_path")
    if ckpt != "auto":
        return ckpt
    from vdm.utils.resume import find_resume_checkpoint

    found = find_resume_checkpoint(cfg.paths.output_dir)
    if found is not None:
        log.info("resuming from %s", found)
    return str(found) if found is not None else None


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate, build and fit; returns the final metrics (validation metrics when ``validate``)."""
    datamodule, module, trainer = setup_run(cfg)
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
