"""Train a vdm stage: ``python train.py [stage=vae] [overrides...]`` (see README)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from vdm.utils.config_check import validate_config
from vdm.utils.runtime import (
    apply_auto_precision,
    configure_torch,
    resolved_config,
    save_resolved_config,
    save_run_metrics,
    scalar_metrics,
)

log = logging.getLogger("vdm.train")


def prepare_corpus(cfg: DictConfig) -> None:
    """Generate the built-in synthetic corpus (and its stand-in text encoder) on first use, then the latent
    corpus that ``latents.from_corpus`` asks for; each is a no-op when it exists with the same settings."""
    if cfg.get("synthetic") is not None:
        from data_prep.synthetic import ensure_synthetic_corpus

        ensure_synthetic_corpus(**cfg.synthetic)
    if cfg.get("synthetic_text_encoder") is not None:
        from data_prep.text_encoder import ensure_random_text_encoder, synthetic_vocabulary

        ensure_random_text_encoder(**cfg.synthetic_text_encoder, vocab=synthetic_vocabulary())
    latents = cfg.get("latents")
    if latents is not None and latents.get("from_corpus") is not None:
        from data_prep.precompute_latents import ensure_latent_corpus

        encoder = hydra.utils.instantiate(cfg.model.text_encoder) if cfg.model.get("text_encoder") else None
        ensure_latent_corpus(latents.root, latents.from_corpus, cfg.model.vae_export,
                             num_frames=cfg.data.num_frames, height=cfg.data.height, width=cfg.data.width,
                             text_encoder=encoder)


def resolve_run_inputs(cfg: DictConfig) -> None:
    """Settings that depend on this machine or on earlier runs, fixed before the config is checked:
    ``trainer.precision=auto``, the synthetic corpus's prompt files where none are named, and a stage-2
    ``model.vae_export`` given as ``latest`` or a run name."""
    apply_auto_precision(cfg)
    synthetic = cfg.get("synthetic")
    for key, name in (("heldout_prompts_file", "prompts_heldout.txt"),
                      ("eval_prompts_file", "prompts_eval.jsonl")):
        if key in cfg and cfg[key] is None and synthetic is not None:
            cfg[key] = str(Path(synthetic.root) / name)
    model = cfg.get("model")
    if model is None or "vae_export" not in model or OmegaConf.is_missing(model, "vae_export"):
        return
    export = model.vae_export
    from vdm.utils.config_rules import ConfigError
    from vdm.utils.vae_export import ExportError, resolve_vae_export

    try:
        path, how = resolve_vae_export(export, cfg.paths.log_dir)
    except ExportError as err:
        if export == "latest":
            raise ConfigError(str(err)) from err
        return  # the config check names the bad path
    log.info("VAE export: %s (%s)", path, how)
    cfg.model.vae_export = str(path)


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


def apply_global_batch(cfg: DictConfig) -> None:
    """``global_batch_size`` (samples per optimizer step over all ranks) sets the per-rank data.batch_size."""
    if cfg.get("global_batch_size") is None:
        return
    from vdm.utils.config_rules import check_global_batch, world_size

    world = world_size(cfg)
    if world is None:  # every visible GPU on each node
        import torch

        world = max(torch.cuda.device_count(), 1) * int(cfg.trainer.get("num_nodes") or 1)
    accumulate = cfg.trainer.get("accumulate_grad_batches") or 1
    per_rank = check_global_batch(cfg.global_batch_size, world, accumulate)
    with open_dict(cfg):
        cfg.data.batch_size = per_rank
    log.info("global_batch_size=%d: data.batch_size=%d on %d ranks", cfg.global_batch_size, per_rank, world)


def setup_run(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """Validate the config (before anything heavy), record it, seed, then build data, module and trainer."""
    resolve_run_inputs(cfg)
    validate_config(cfg)
    apply_global_batch(cfg)
    save_resolved_config(resolved_config(cfg), cfg.paths.output_dir)
    configure_torch(cfg.float32_matmul_precision)

    import lightning as L

    L.seed_everything(cfg.seed, workers=True)
    prepare_corpus(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    return datamodule, instantiate_module(cfg), instantiate_trainer(cfg)


def resume_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``, with ``auto`` resolved to the newest complete checkpoint of the run directory."""
    from vdm.utils.resume import checkpoint_complete, find_resume_checkpoint

    ckpt = cfg.get("ckpt_path")
    if ckpt not in ("auto", "last", "hpc", None) and Path(ckpt).exists() and not checkpoint_complete(ckpt):
        newest = find_resume_checkpoint(Path(ckpt).resolve().parent.parent)
        hint = (f"the newest complete one there is {newest}" if newest
                else "there is no complete one beside it")
        raise RuntimeError(
            f"ckpt_path: {ckpt} is incomplete (a save cut short: truncated file, or a DeepSpeed directory "
            f"without its `latest` tag); {hint}. ckpt_path=auto picks the newest complete checkpoint"
        )
    if ckpt != "auto":
        return ckpt
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
