"""vdm's own config rules: ranges and cross-field constraints that signatures cannot express.

Each rule fails with a ``ConfigError`` naming the key, the value and what is allowed, before anything heavy
runs (``vdm.config.check.validate_config`` calls ``check_project_rules`` on the resolved config).
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vdm.metrics.clip_score import CLIP_AGGREGATIONS
from vdm.metrics.frechet import COVARIANCES
from vdm.models.dit import check_fits, check_heads, token_grid
from vdm.models.vae import check_video_size, compression


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type or range; the message names the key."""


def _get(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _require(cfg: Mapping, key: str, ok: Callable[[Any], bool], what: str) -> None:
    value = _get(cfg, key)
    if value is not None and not ok(value):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")


def check_project_rules(cfg: Mapping) -> None:
    """Ranges and cross-field rules of vdm's own keys (resolved plain-dict config)."""
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    unit = lambda v: isinstance(v, (int, float)) and 0.0 <= v <= 1.0  # noqa: E731
    _require(cfg, "seed", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    for key in ("data.batch_size", "data.val_batch_size", "data.num_frames", "data.height", "data.width",
                "trainer.accumulate_grad_batches", "global_batch_size"):
        _require(cfg, key, positive, "an integer > 0")
    _require(cfg, "data.num_workers", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    _require(cfg, "data.max_skip_rate", unit, "a rate in [0, 1]")
    _require(cfg, "optimizer.lr", lambda v: isinstance(v, (int, float)) and v > 0, "a learning rate > 0")
    _require(cfg, "optimizer.weight_decay", lambda v: isinstance(v, (int, float)) and v >= 0, "a value >= 0")
    _require(cfg, "trainer.max_steps", lambda v: v == -1 or (isinstance(v, int) and v > 0), "-1 or > 0")
    _require(cfg, "module.caption_dropout", unit, "a probability in [0, 1]")
    _require(cfg, "module.i2v_probability", unit, "a probability in [0, 1]")
    below_one = lambda v: isinstance(v, (int, float)) and 0.0 <= v < 1.0  # noqa: E731
    _require(cfg, "module.ema_decay", below_one, "a value in [0, 1)")
    _require(cfg, "module.grad_clip", lambda v: isinstance(v, (int, float)) and v > 0, "null or a norm > 0")
    if _get(cfg, "module._target_") == "vdm.lightning.vae_module.VAEModule":
        _check_vae_shapes(cfg, _get(cfg, "model.vae") or {})
    if _get(cfg, "module._target_") == "vdm.lightning.diffusion_module.DiffusionModule":
        _check_diffusion(cfg)
    _check_metric_weights(cfg)
    _check_precision(cfg)
    _check_strategy(cfg)
    _check_global_batch(cfg)
    _check_resume(cfg)


def _check_precision(cfg: Mapping) -> None:
    precision = _get(cfg, "trainer.precision")
    if precision is None:
        return
    if str(precision).startswith("16") and _get(cfg, "optimizer.fused") and _get(cfg, "module.grad_clip"):
        raise ConfigError(
            "optimizer.fused: a fused optimizer unscales fp16 gradients itself, so they cannot be clipped "
            "under trainer.precision=16-mixed; set optimizer.fused=false, or module.grad_clip=null, or use "
            "trainer.precision=bf16-mixed"
        )
    from lightning.fabric.connector import _PRECISION_INPUT

    allowed = [v for group in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(group)]
    if precision not in allowed:
        raise ConfigError(f"trainer.precision: {precision!r} is not one of {allowed}")


def world_size(cfg: Mapping) -> int | None:
    """Processes the trainer will run: trainer.devices x trainer.num_nodes (None when not known yet)."""
    devices, nodes = _get(cfg, "trainer.devices"), _get(cfg, "trainer.num_nodes") or 1
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if _get(cfg, "trainer.accelerator") == "cpu":
        return nodes  # Lightning runs one CPU process per node for devices=auto / -1
    return None  # every visible GPU: known once the trainer exists


def _check_global_batch(cfg: Mapping) -> None:
    """``global_batch_size`` splits evenly over ranks and gradient-accumulation steps."""
    total = _get(cfg, "global_batch_size")
    world = world_size(cfg)
    if total is None or world is None:
        return
    accumulate = _get(cfg, "trainer.accumulate_grad_batches") or 1
    check_global_batch(total, world, accumulate)


def check_global_batch(total: int, world: int, accumulate: int) -> int:
    """The per-rank batch of ``total`` samples per optimizer step; ConfigError when it does not divide."""
    parts = world * accumulate
    if total % parts:
        multiples = [parts * k for k in range(max(1, total // parts), max(1, total // parts) + 3)]
        raise ConfigError(
            f"global_batch_size: {total} is not divisible by the {world} ranks (trainer.devices x "
            f"trainer.num_nodes) x trainer.accumulate_grad_batches={accumulate}; allowed: multiples of "
            f"{parts}, e.g. {multiples}"
        )
    return total // parts


def _check_resume(cfg: Mapping) -> None:
    if "train" not in cfg or "ckpt_path" not in cfg:
        return  # evaluate.py has its own checkpoint rules
    ckpt = _get(cfg, "ckpt_path")
    if ckpt is None or ckpt in ("auto", "last", "hpc") or os.path.exists(str(ckpt)) or "://" in str(ckpt):
        return
    allowed = "auto, last, hpc, null or the path of a checkpoint"
    raise ConfigError(f"ckpt_path: {ckpt} does not exist; allowed: {allowed}")


def _check_strategy(cfg: Mapping) -> None:
    """Combinations a strategy cannot serve fail here, not at the first step."""
    strategy = _get(cfg, "trainer.strategy")
    if isinstance(strategy, str) and strategy != "auto":
        from lightning.pytorch.strategies import StrategyRegistry

        allowed = ["auto", *StrategyRegistry.available_strategies()]
        if strategy not in allowed:
            conf = Path(__file__).resolve().parents[2] / "conf" / "strategy"
            groups = sorted(p.stem for p in conf.glob("*.yaml"))
            raise ConfigError(
                f"trainer.strategy: unknown strategy {strategy!r}; use a config group option "
                f"(strategy={'|'.join(groups)}) or one of Lightning's names {allowed}"
            )
    target = str(strategy.get("_target_", "")) if isinstance(strategy, Mapping) else str(strategy or "")
    stage1 = _get(cfg, "module._target_") == "vdm.lightning.vae_module.VAEModule"
    if "deepspeed" in target.lower() and stage1 and _get(cfg, "trainer.strategy.stage") == 3:
        raise ConfigError(
            "trainer.strategy.stage: 3 is not supported for stage 1 (the VAE export at the end of fit runs "
            "the model on one rank, which ZeRO-3's sharded parameters do not allow); the VAE fits in one "
            "GPU: use strategy=deepspeed_stage_2, ddp or fsdp"
        )
    if "deepspeed" in target.lower() and _get(cfg, "module.discriminator") is not None:
        raise ConfigError(
            "module.discriminator: DeepSpeed drives a single optimizer, but stage 1 with its GAN has two; "
            "use strategy=ddp or strategy=fsdp, or train without the GAN (module.discriminator=null "
            "module.disc_optimizer=null)"
        )


def _check_metric_weights(cfg: Mapping) -> None:
    """Metric weights exist locally, and FVD's I3D gets enough frames (its logits pool needs >= 9)."""
    _require(cfg, "metrics.i3d_bn_eps", lambda v: isinstance(v, (int, float)) and v > 0, "an epsilon > 0")
    _require(cfg, "metrics.fvd_covariance", lambda v: v in COVARIANCES, f"one of {list(COVARIANCES)}")
    _require(cfg, "metrics.clip_aggregation", lambda v: v in CLIP_AGGREGATIONS,
             f"one of {list(CLIP_AGGREGATIONS)}")
    for key in ("metrics.clip_path", "metrics.i3d_path"):
        path = _get(cfg, key)
        if path is not None and not Path(str(path)).exists():
            raise ConfigError(f"{key}: {path} does not exist (weights load from local paths only)")
    frames = _get(cfg, "data.num_frames")
    if _get(cfg, "metrics.i3d_path") is not None and isinstance(frames, int) and frames < 9:
        raise ConfigError(f"data.num_frames: {frames}, but FVD (metrics.i3d_path) needs clips of >= 9 frames")


def _vae_compression(vae: Mapping) -> tuple[int, int] | None:
    """(spatial, temporal) compression of a VAE config (None when it does not say)."""
    mults, tdown, patch = vae.get("channel_mults"), vae.get("temporal_downsample"), vae.get("patch_size")
    if mults is None or tdown is None:
        return None
    return compression(patch if isinstance(patch, int) else 1, mults, tdown)


def _check_vae_shapes(cfg: Mapping, vae: Mapping) -> None:
    """The clip shape fits the VAE's compression (the VAE's own rule: T = 1 + tc * k, H and W multiples of
    sc)."""
    factors = _vae_compression(vae)
    sizes = [_get(cfg, f"data.{k}") for k in ("num_frames", "height", "width")]
    if factors is None or not all(isinstance(x, int) for x in sizes):
        return
    sc, tc = factors
    try:
        check_video_size(*sizes, spatial=sc, temporal=tc)
    except ValueError as err:
        raise ConfigError(
            f"data.num_frames, data.height, data.width = {', '.join(map(str, sizes))} do not fit the VAE's "
            f"{tc}x temporal and {sc}x spatial compression: {err}"
        ) from None


def _check_diffusion(cfg: Mapping) -> None:
    """Stage 2: the VAE export exists and fits the DiT (channels), the clip shape and the text encoder."""
    export = _get(cfg, "model.vae_export")
    config_file = Path(str(export)) / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"model.vae_export: {export} is not a VAE export (no config.json); "
            "train stage 1 first (python train.py stage=vae writes <output_dir>/vae_export)"
        )
    vae = json.loads(config_file.read_text())
    _check_vae_shapes(cfg, vae)
    dit = _get(cfg, "model.dit") or {}
    channels, text_dim = int(vae.get("latent_channels", 0)), _text_encoder_width(cfg)
    context_dim = dit.get("context_dim")
    if text_dim is None or context_dim is None:  # nothing to compare
        text_dim = context_dim = 0
    try:
        check_fits(dit.get("in_channels") or channels, dit.get("cond_channels") or 0, context_dim,
                   latent_channels=channels, text_dim=text_dim,
                   image_conditioning=(_get(cfg, "module.i2v_probability") or 0) > 0)
    except ValueError as err:
        raise ConfigError(f"model.dit.{err}") from None
    _check_dit_shapes(cfg, vae)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_dit_shapes(cfg: Mapping, vae: Mapping) -> None:
    """The DiT's own rules: heads split its width into even head widths, and its patches tile the latent
    clip exactly."""
    hidden, heads = _get(cfg, "model.dit.hidden_size"), _get(cfg, "model.dit.num_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        try:
            check_heads(hidden, heads)
        except ValueError as err:
            raise ConfigError(f"model.dit.num_heads: {heads}: {err}") from None
    patch = _get(cfg, "model.dit.patch_size")
    factors = _vae_compression(vae)
    frames, h, w = (_get(cfg, f"data.{k}") for k in ("num_frames", "height", "width"))
    if not (isinstance(patch, list) and len(patch) == 3 and factors is not None):
        return
    if not all(isinstance(x, int) for x in (frames, h, w)):
        return
    sc, tc = factors
    latent = ((frames - 1) // tc + 1, h // sc, w // sc)
    try:
        token_grid(latent, patch)
    except ValueError:
        allowed = ", ".join(f"{axis} in {_divisors(size)}" for axis, size in zip("thw", latent))
        raise ConfigError(
            f"model.dit.patch_size: {patch} does not divide the latent clip (T, H, W) = {latent} of "
            f"data.num_frames={frames}, data.height={h}, data.width={w}; allowed per axis: {allowed}"
        ) from None


def _text_encoder_width(cfg: Mapping) -> int | None:
    """Hidden size of the configured text encoder (its config.json, or the stand-in still to be built)."""
    path = _get(cfg, "model.text_encoder.path")
    config_file = Path(str(path)) / "config.json"
    if path is not None and config_file.is_file():
        config = json.loads(config_file.read_text())
        config = config.get("text_config", config)
        return config.get("d_model", config.get("hidden_size"))
    if _get(cfg, "synthetic_text_encoder") is not None:
        return _get(cfg, "synthetic_text_encoder.hidden_size")
    raise ConfigError(
        f"model.text_encoder.path: {path} holds no text encoder (config.json); put a local T5/CLIP "
        "directory there (nothing is downloaded)"
    )
