"""The stage-1 export that stage 2 trusts: weights, model config, latent statistics and a content hash.

Layout of an export directory::

    model.safetensors   VideoVAE weights
    config.json         {"_target_": "vdm.models.vae.VideoVAE", **constructor args}
    latent_stats.json   {"mean": [C], "std": [C], "num_clips": n}   per latent channel, posterior mode
    export.json         {"vae_hash": sha256, "files": {...}}         the hash covers the three files above

Stage 2 normalizes latents as (z - mean) / std and refuses an export whose hash does not match.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vdm.utils.hashing import sha256_files
from vdm.utils.io import atomic_dir

log = logging.getLogger(__name__)

HASHED_FILES = ("model.safetensors", "config.json", "latent_stats.json")
_ALLOWED_PREFIX = "vdm.models."


class ExportError(ValueError):
    """An export directory is incomplete, altered, or names a class outside vdm.models."""


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of VAE latents over ``num_clips`` clips."""

    mean: list[float]
    std: list[float]
    num_clips: int


@dataclass(frozen=True)
class VAEExport:
    model: torch.nn.Module
    stats: LatentStats
    vae_hash: str
    config: dict[str, Any]


@torch.no_grad()
def compute_latent_stats(
    encode: Callable[[torch.Tensor], torch.Tensor], videos: Iterable[torch.Tensor], num_clips: int
) -> LatentStats:
    """Per-channel statistics of ``encode(x)`` latents (B, C, T, H, W) over the first ``num_clips`` clips.

    Sums are accumulated in float64 so the statistics do not drift over many clips.
    """
    total = sq = None
    count, clips = 0, 0
    for x in videos:
        x = x[: num_clips - clips]
        z = encode(x).double()  # B C T H W
        per_channel = z.transpose(0, 1).flatten(1)  # C N
        total = per_channel.sum(1) if total is None else total + per_channel.sum(1)
        sq = per_channel.pow(2).sum(1) if sq is None else sq + per_channel.pow(2).sum(1)
        count += per_channel.shape[1]
        clips += x.shape[0]
        if clips >= num_clips:
            break
    if total is None or clips == 0:
        raise ValueError("compute_latent_stats: no clips were given")
    mean = total / count
    var = (sq / count - mean.pow(2)).clamp_min(0.0) * count / max(count - 1, 1)
    return LatentStats([float(v) for v in mean], [float(math.sqrt(v)) for v in var], clips)


def _sha256_files(directory: Path) -> str:
    return sha256_files((name, directory / name) for name in HASHED_FILES)


def export_vae(model: torch.nn.Module, config: Mapping[str, Any], stats: LatentStats,
               out_dir: str | Path) -> str:
    """Write the export directory (atomically: a temporary sibling, then rename); returns the VAE hash."""
    out = Path(out_dir)
    if "_target_" not in config or not str(config["_target_"]).startswith(_ALLOWED_PREFIX):
        raise ExportError(f"config needs a _target_ under {_ALLOWED_PREFIX}, got {config.get('_target_')!r}")
    with atomic_dir(out) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
        (tmp / "latent_stats.json").write_text(json.dumps(asdict(stats), indent=2))
        vae_hash = _sha256_files(tmp)
        manifest = {"vae_hash": vae_hash, "files": list(HASHED_FILES)}
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2))
    log.info("VAE export written to %s (hash %s)", out, vae_hash[:12])
    return vae_hash


def load_vae_export(path: str | Path, expected_hash: str | None = None) -> VAEExport:
    """Load an export, verifying its content hash (and ``expected_hash`` when given); strict weights."""
    path = Path(path)
    for name in (*HASHED_FILES, "export.json"):
        if not (path / name).is_file():
            raise ExportError(f"VAE export {path} is missing {name}")
    recorded = json.loads((path / "export.json").read_text())["vae_hash"]
    actual = _sha256_files(path)
    if actual != recorded:
        raise ExportError(
            f"VAE export {path} was modified: content hash {actual[:12]} != recorded {recorded[:12]}"
        )
    if expected_hash is not None and actual != expected_hash:
        raise ExportError(f"VAE export {path} has hash {actual[:12]}, expected {expected_hash[:12]}")
    config = json.loads((path / "config.json").read_text())
    target = str(config.pop("_target_"))
    if not target.startswith(_ALLOWED_PREFIX):
        raise ExportError(
            f"VAE export {path}: refusing to build {target!r} (only {_ALLOWED_PREFIX}* classes)"
        )
    module_name, _, cls_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    model = cls(**config)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    stats = LatentStats(**json.loads((path / "latent_stats.json").read_text()))
    return VAEExport(model.eval().requires_grad_(False), stats, actual, {"_target_": target, **config})


def is_export(path: str | Path) -> bool:
    """Whether ``path`` holds a complete export (every hashed file and ``export.json``)."""
    return all((Path(path) / name).is_file() for name in (*HASHED_FILES, "export.json"))


def resolve_vae_export(value: str | Path, log_dir: str | Path) -> tuple[Path, str]:
    """Find the export that ``model.vae_export`` names; returns (export directory, how it was found).

    ``value`` is an export directory, a stage-1 run directory holding ``vae_export/``, the name of a run
    under ``log_dir/*/runs/`` (e.g. ``my_vae_run``), or ``latest``: the newest complete export under
    ``log_dir`` (by the time its ``export.json`` was written).
    """
    log_dir = Path(log_dir)
    if str(value) == "latest":
        found = sorted(log_dir.glob("*/runs/*/vae_export/export.json"), key=lambda p: p.stat().st_mtime_ns)
        complete = [p.parent for p in found if is_export(p.parent)]
        if not complete:
            raise ExportError(
                f"model.vae_export=latest: no VAE export under {log_dir}/*/runs/; train stage 1 first "
                "(python train.py stage=vae) or name an export directory"
            )
        return complete[-1].resolve(), f"the newest export under {log_dir}"
    path = Path(str(value))
    for candidate, how in ((path, "as given"), (path / "vae_export", "in the run directory")):
        if is_export(candidate):
            return candidate.resolve(), how
    runs = sorted(log_dir.glob(f"*/runs/{value}/vae_export"))
    complete = [p for p in runs if is_export(p)]
    if len(complete) == 1:
        return complete[0].resolve(), f"of run {value}"
    if len(complete) > 1:
        raise ExportError(f"model.vae_export={value}: several runs of that name hold exports: {complete}")
    raise ExportError(
        f"model.vae_export={value}: not an export directory, a run directory with vae_export/, or the name "
        f"of a run under {log_dir}/*/runs/ with a complete export (or use latest)"
    )
