"""Run-level set-up that belongs to the entry points, not to import time."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vdm.utils.io import atomic_write

log = logging.getLogger(__name__)


def configure_torch(float32_matmul_precision: str = "high") -> None:
    """Matmul precision (TF32 on Ampere+ when 'high'); called once by train.py / evaluate.py."""
    import torch

    torch.set_float32_matmul_precision(float32_matmul_precision)


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AMX or AVX512-BF16); elsewhere bf16 is emulated
    and runs ~100x slower than fp32 (measured on an AVX2-only CPU: 0.7 vs 63 GFLOP/s)."""
    import torch

    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_precision(precision: Any, accelerator: Any) -> Any:
    """``auto``: ``bf16-mixed`` on CUDA GPUs with bf16 and on CPUs with native bf16, else ``32-true``."""
    if precision != "auto":
        return precision
    import torch

    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def apply_auto_precision(cfg: DictConfig) -> None:
    """Replace ``trainer.precision=auto`` by what this machine runs fastest (see ``resolve_precision``)."""
    trainer = cfg.get("trainer")
    if trainer is None or trainer.get("precision") != "auto":
        return
    chosen = resolve_precision("auto", trainer.get("accelerator"))
    trainer.precision = chosen
    log.info("trainer.precision=auto: %s on this machine", chosen)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as a plain, fully resolved dict (no Hydra runtime node): what checkpoints store."""
    run_keys = [k for k in cfg if k != "hydra"]
    plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, run_keys), resolve=True, throw_on_missing=True)
    assert isinstance(plain, dict)
    return plain


def _global_rank() -> int:
    """Rank from the launcher's environment (torchrun, SLURM, Lightning), 0 when not distributed."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def save_resolved_config(cfg: Mapping[str, Any], output_dir: str | Path) -> Path | None:
    """Write ``config_resolved.yaml`` into the run's output dir (rank zero only) and return its path."""
    if _global_rank() != 0:
        return None
    text = OmegaConf.to_yaml(OmegaConf.create(dict(cfg)))
    path = atomic_write(Path(output_dir) / "config_resolved.yaml", text)
    log.info("resolved config written to %s", path)
    return path


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Trainer metrics (tensors) as plain floats, for return values and JSON."""
    import torch

    out = {}
    for key, value in metrics.items():
        if torch.is_tensor(value) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out


def save_run_metrics(metrics: Mapping[str, float], output_dir: str | Path) -> Path | None:
    """Write the run's final ``metrics.json`` (rank zero only); ``vdm.utils.sweeps`` tabulates these."""
    if _global_rank() != 0:
        return None
    import json

    # the pipeline takes this file as "stage finished": it must never be seen half written
    return atomic_write(Path(output_dir) / "metrics.json",
                        json.dumps({"metrics": dict(metrics)}, sort_keys=True, indent=2) + "\n")
