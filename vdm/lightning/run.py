"""The run setup that ``train.py`` and ``evaluate.py`` share (the composition root): fix the settings that
depend on this machine or on earlier runs, check the config before anything heavy, then build the data,
the stage's LightningModule and the Trainer from the config's ``_target_`` nodes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from vdm.config.check import validate_config
from vdm.utils.runtime import apply_auto_precision, configure_torch, resolved_config, save_resolved_config

log = logging.getLogger(__name__)

#: makes what a run needs on disk (e.g. ``data_prep.prepare.prepare_corpus``), given the config and a
#: builder of the run's text encoder
Prepare = Callable[[DictConfig, Callable[[], Any] | None], None]


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
    from vdm.config.rules import ConfigError
    from vdm.utils.vae_export import ExportError, resolve_vae_export

    try:
        path, how = resolve_vae_export(export, cfg.paths.log_dir)
    except ExportError as err:
        if export == "latest":
            raise ConfigError(str(err)) from err
        return  # the config check names the bad path
    log.info("VAE export: %s (%s)", path, how)
    cfg.model.vae_export = str(path)


def apply_global_batch(cfg: DictConfig) -> None:
    """``global_batch_size`` (samples per optimizer step over all ranks) sets the per-rank data.batch_size."""
    if cfg.get("global_batch_size") is None:
        return
    from vdm.config.rules import check_global_batch, world_size

    world = world_size(cfg)
    if world is None:  # every visible GPU on each node
        import torch

        world = max(torch.cuda.device_count(), 1) * int(cfg.trainer.get("num_nodes") or 1)
    accumulate = cfg.trainer.get("accumulate_grad_batches") or 1
    per_rank = check_global_batch(cfg.global_batch_size, world, accumulate)
    with open_dict(cfg):
        cfg.data.batch_size = per_rank
    log.info("global_batch_size=%d: data.batch_size=%d on %d ranks", cfg.global_batch_size, per_rank, world)


def instantiate_trainer(cfg: DictConfig) -> Any:
    """Trainer with the configured callbacks and loggers."""
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def instantiate_models(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.model`` as module arguments: one object per ``_target_`` child (stage 1: ``vae``; stage 2:
    ``dit``, ``text_encoder``); plain values (stage 2's ``vae_export``) stay in the YAML."""
    children = {k: v for k, v in cfg.model.items() if isinstance(v, DictConfig) and "_target_" in v}
    return {k: hydra.utils.instantiate(v) for k, v in children.items()}


def instantiate_module(cfg: DictConfig) -> Any:
    """The stage's LightningModule around freshly built models, carrying the resolved run config."""
    models = instantiate_models(cfg)
    optimizer = hydra.utils.instantiate(cfg.optimizer)
    module = hydra.utils.instantiate(cfg.module, **models, optimizer=optimizer)
    module.run_config = resolved_config(cfg)  # plain dict, stored in every checkpoint
    return module


def text_encoder_builder(cfg: DictConfig) -> Callable[[], Any] | None:
    """Builds the run's frozen text encoder on call (None when the model has none)."""
    node = (cfg.get("model") or {}).get("text_encoder")
    return None if node is None else (lambda: hydra.utils.instantiate(node))


def setup_run(cfg: DictConfig, prepare: Prepare | None = None) -> tuple[Any, Any, Any]:
    """Validate the config (before anything heavy), record it, seed, make what the run needs on disk
    (``prepare``), then build data, module and trainer."""
    resolve_run_inputs(cfg)
    validate_config(cfg)
    apply_global_batch(cfg)
    save_resolved_config(resolved_config(cfg), cfg.paths.output_dir)
    configure_torch(cfg.float32_matmul_precision)

    import lightning as L

    L.seed_everything(cfg.seed, workers=True)
    if prepare is not None:
        prepare(cfg, text_encoder_builder(cfg))
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
