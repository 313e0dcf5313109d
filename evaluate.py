"""Evaluate a checkpoint on held-out data: ``python evaluate.py ckpt_path=PATH [overrides...]``.

Stage 1 (VAE): validation loss and per-frame PSNR on the validation split, written to ``metrics.json``.
Stage 2 (``stage=diffusion model.vae_export=...``): videos for the held-out prompts (``generation.*``,
resumable), CLIP score and FVD when their local weights are given (``metrics.*``), ``metrics.json``
with the protocol manifest, and a self-contained ``report.html``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from data_prep.prepare import prepare_corpus
from vdm.config.check import ConfigError, validate_config
from vdm.lightning.run import setup_run
from vdm.utils.checkpoints import load_checkpoint

log = logging.getLogger("vdm.evaluate")


#: what a checkpoint's stored run config decides: the stage (module, optimizer), the model with its VAE export
#: and text encoder, the data and where the evaluation prompts live
RUN_KEYS = ("model", "module", "optimizer", "data", "synthetic", "synthetic_text_encoder", "latents",
            "corpus", "heldout_prompts_file", "eval_prompts_file")


#: model keys that locate files rather than shape the weights: a command line may move them
MOVABLE = ("vae_export", "path")


def command_line_overrides() -> list[str]:
    """The ``key=value`` overrides this run was started with (none outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def use_checkpoint_config(cfg: DictConfig, stored: dict, overrides: list[str], ckpt: Path) -> None:
    """Evaluate the stage, model and data the checkpoint was trained with (its stored, resolved config), so
    ``ckpt_path`` alone is enough. Command-line overrides of those keys (``data.batch_size=8``) still win,
    except for the model's architecture, which the weights fix (its file locations may move)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    model = stored.get("model")
    if isinstance(model, dict) and "_target_" in model:  # a stage-1 config from before model.vae
        stored = {**stored, "model": {"vae": model}}
    with open_dict(cfg):
        for key in RUN_KEYS:
            if key in stored:
                cfg[key] = stored[key]
            elif key.endswith("_prompts_file"):
                cfg[key] = None  # found from the stored corpus, if any
            elif key in cfg:
                del cfg[key]
        for override in OverridesParser.create().parse_overrides(overrides):
            key = override.key_or_group
            if key.split(".")[0] not in RUN_KEYS:
                continue
            architecture = key.startswith("model.") and key.rsplit(".", 1)[-1] not in MOVABLE
            if "." not in key or architecture:
                log.warning("ignoring %s: the checkpoint decides %s", override.input_line, key)
                continue
            OmegaConf.update(cfg, key, override.value(), merge=False, force_add=True)
    log.info("stage, model and data from the config stored in %s", ckpt)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Load ``cfg.ckpt_path`` (a Lightning ``.ckpt``, a DeepSpeed checkpoint directory or a safetensors
    export) into the configured stage and evaluate it; returns the metrics."""
    validate_config(cfg)
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.exists():
        raise ConfigError(f"ckpt_path: no such checkpoint: {ckpt}")
    checkpoint = load_checkpoint(ckpt)
    log.info("loaded %s checkpoint %s (step %s)", checkpoint.format, ckpt, checkpoint.meta.get("global_step"))
    stored = checkpoint.meta.get("vdm_config")
    if stored:
        use_checkpoint_config(cfg, stored, command_line_overrides(), ckpt)
    datamodule, module, trainer = setup_run(cfg, prepare=prepare_corpus)
    from vdm.eval.generation import write_metrics
    from vdm.eval.text_to_video import evaluate_generation, load_weights

    if hasattr(module, "sample"):  # stage 2: generate and score
        return evaluate_generation(module, cfg, ckpt, checkpoint, Path(cfg.paths.output_dir), datamodule)
    load_weights(module, checkpoint)
    results = trainer.validate(module, datamodule=datamodule, verbose=True)
    metrics = {k: float(v) for k, v in results[0].items()}
    manifest = {"checkpoint": str(ckpt.resolve()), "checkpoint_sha256": checkpoint.sha256,
                "checkpoint_format": checkpoint.format, "global_step": checkpoint.meta.get("global_step")}
    out = write_metrics(cfg.paths.output_dir, metrics, manifest)
    log.info("metrics written to %s: %s", out, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
