"""Evaluate a checkpoint on held-out data: ``python evaluate.py ckpt_path=PATH [overrides...]``.

Stage 1 (VAE): validation loss and per-frame PSNR on the validation split, written to ``metrics.json``.
Stage 2 (``stage=diffusion model.vae_export=...``): videos for the held-out prompts (``generation.*``,
resumable), CLIP score and FVD when their local weights are given (``metrics.*``), ``metrics.json``
with the protocol manifest, and a self-contained ``report.html``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from train import setup_run
from vdm.utils.checkpoints import LoadedCheckpoint, load_checkpoint
from vdm.utils.config_check import ConfigError, validate_config

log = logging.getLogger("vdm.evaluate")


def use_stored_model_config(cfg: DictConfig, checkpoint: LoadedCheckpoint, ckpt: Path) -> None:
    """Build the model the checkpoint was trained with (its stored config), whatever ``model=`` says."""
    stored = checkpoint.meta.get("vdm_config") or {}
    if "model" in stored and OmegaConf.to_container(cfg.model, resolve=True) != stored["model"]:
        log.info("using the model config stored in %s", ckpt)
        with open_dict(cfg):
            cfg.model = stored["model"]


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Load ``cfg.ckpt_path`` (a Lightning ``.ckpt``, a DeepSpeed checkpoint directory or a safetensors
    export) into the configured stage and evaluate it; returns the metrics."""
    validate_config(cfg)
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.exists():
        raise ConfigError(f"ckpt_path: no such checkpoint: {ckpt}")
    checkpoint = load_checkpoint(ckpt)
    log.info("loaded %s checkpoint %s (step %s)", checkpoint.format, ckpt, checkpoint.meta.get("global_step"))
    use_stored_model_config(cfg, checkpoint, ckpt)
    datamodule, module, trainer = setup_run(cfg)
    from vdm.lightning.generation_eval import evaluate_generation, load_weights

    if hasattr(module, "sample"):  # stage 2: generate and score
        return evaluate_generation(module, cfg, ckpt, checkpoint, Path(cfg.paths.output_dir), datamodule)
    load_weights(module, checkpoint)
    results = trainer.validate(module, datamodule=datamodule, verbose=True)
    metrics = {k: float(v) for k, v in results[0].items()}
    out = Path(cfg.paths.output_dir) / "metrics.json"
    manifest = {"checkpoint": str(ckpt.resolve()), "checkpoint_sha256": checkpoint.sha256,
                "checkpoint_format": checkpoint.format, "global_step": checkpoint.meta.get("global_step")}
    out.write_text(json.dumps({"metrics": metrics, "protocol": manifest}, indent=2, sort_keys=True))
    log.info("metrics written to %s: %s", out, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
