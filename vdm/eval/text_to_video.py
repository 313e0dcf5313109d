"""Stage-2 evaluation: sample held-out prompts from a checkpoint, score them, write metrics and a report.

Used by ``evaluate.py`` for ``DiffusionModule`` checkpoints. Videos are generated with
``vdm.eval.generation.generate_videos`` (seeded, resumable), read back from their mp4s (so a resumed run
scores exactly the files it keeps) and scored with CLIP (``metrics.clip_path``) and, given an I3D
file (``metrics.i3d_path``) and real reference statistics (``metrics.reference_stats``), FVD.
Every setting that changes the numbers is recorded in the protocol manifest of ``metrics.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from vdm.eval.attributes import attribute_protocol, score_videos, write_verdicts
from vdm.eval.generation import GeneratedVideo, generate_videos, read_frames, read_video, write_metrics
from vdm.eval.prompts import read_prompts
from vdm.eval.report import write_report
from vdm.metrics.clip_score import ClipAggregation, CLIPScore, CLIPScorer
from vdm.metrics.frechet import Covariance, FeatureStatistics, FrechetVideoDistance, save_statistics
from vdm.metrics.i3d import detector_hash, fvd_preprocess, is_torchscript, load_i3d
from vdm.utils.checkpoints import LoadedCheckpoint, checkpoint_hash

log = logging.getLogger(__name__)


def load_weights(module: torch.nn.Module, checkpoint: LoadedCheckpoint) -> None:
    """Put a loaded checkpoint's weights into ``module`` (strict; the module's own checks run first, e.g.
    stage 2 refuses a checkpoint trained on another VAE and restores the frozen VAE's weights)."""
    lightning_checkpoint = {**checkpoint.meta, "state_dict": dict(checkpoint.state_dict)}
    module.on_load_checkpoint(lightning_checkpoint)
    module.load_state_dict(lightning_checkpoint["state_dict"], strict=True)


def sampler_name(objective: Any) -> str:
    """``euler``/``heun`` for rectified flow; ``ddim(eta=...)`` for DDPM (its only sampler)."""
    if hasattr(objective, "sampler"):
        return str(objective.sampler)
    return f"ddim(eta={getattr(objective, 'eta', 0.0)})"


@torch.no_grad()
def clip_metrics(
    clip_path: str,
    records: list[GeneratedVideo],
    num_prompts: int,
    aggregation: ClipAggregation = "per_video",
) -> tuple[dict, dict]:
    """(overall {"clipsim", "clip_score"}, per-prompt clip_score by prompt text)."""
    scorer, metric = CLIPScorer(clip_path), CLIPScore(num_prompts=num_prompts, aggregation=aggregation)
    for record in records:
        cos = scorer(read_video(record.path).unsqueeze(0), [record.prompt])
        metric.update(cos, torch.tensor([record.prompt_idx]))
    values = metric.compute()
    per_prompt: dict[str, float] = {}
    for record in records:
        cos = float(values[f"clipsim/prompt_{record.prompt_idx}"])
        per_prompt[record.prompt] = 100.0 * max(cos, 0.0)
    return {"clipsim": float(values["clipsim"]), "clip_score": float(values["clip_score"])}, per_prompt


def fvd_protocol(
    i3d_path: str, frames: int, reference_data: Any, bn_eps: float = 1e-3, covariance: Covariance = "unbiased"
) -> dict[str, Any]:
    """The settings real and generated FVD statistics must share; stored with cached reference statistics.

    ``i3d_bn_eps`` is the batch-norm epsilon the state-dict detector runs with (None for a TorchScript
    detector, whose own is built in); ``covariance`` how the Gaussian fits are normalised.
    """
    return {
        "detector_sha256": detector_hash(i3d_path),
        "i3d_bn_eps": None if is_torchscript(Path(i3d_path)) else float(bn_eps),
        "covariance": covariance,
        "frames": frames,
        "resolution": 224,
        "reference_data": str(reference_data),
        "features": "logits",
    }


@torch.no_grad()
def update_features(
    detector: torch.nn.Module,
    videos: torch.Tensor,
    num_frames: int,
    stats: FeatureStatistics | None,
    covariance: Covariance = "unbiased",
) -> FeatureStatistics:
    """Add the I3D features of ``videos`` (B, 3, T, H, W) in [-1, 1] to ``stats`` (created when None)."""
    features = detector(fvd_preprocess(videos, num_frames=num_frames)).double()
    if stats is None:
        stats = FeatureStatistics(features.shape[1], covariance=covariance).to(features.device)
    stats.update(features)
    return stats


def reference_statistics(
    detector: torch.nn.Module,
    videos: Iterable[torch.Tensor],
    num_frames: int,
    path: Path,
    protocol: dict[str, Any],
) -> int:
    """I3D feature statistics of real ``videos`` (batches (B, 3, T, H, W) in [-1, 1]) cached at ``path``
    with ``protocol``; returns the number of clips."""
    stats: FeatureStatistics | None = None
    for batch in videos:
        stats = update_features(detector, batch, num_frames, stats, protocol.get("covariance", "unbiased"))
    if stats is None:
        raise ValueError("reference statistics: the real data yielded no clips")
    gaussian = stats.compute()
    save_statistics(gaussian, path, protocol)
    return gaussian.count


def real_videos(datamodule: Any) -> Iterator[torch.Tensor]:
    """Every validation clip once (exact mode), padding duplicates dropped, float in [-1, 1]."""
    datamodule.setup("validate")
    for batch in datamodule.val_dataloader():
        batch = datamodule.on_after_batch_transfer(batch, 0)
        keep = torch.tensor([not m.get("pad", False) for m in batch["meta"]])
        if keep.any():
            yield batch["video"][keep]


@torch.no_grad()
def fvd_metric(
    i3d_path: str,
    reference: str,
    records: list[GeneratedVideo],
    num_frames: int,
    protocol: dict[str, Any],
    datamodule: Any = None,
) -> tuple[float, int]:
    """(FVD, real clips) of the generated videos against real statistics made with the same protocol:
    read from ``reference``, or computed there first from the validation split of ``datamodule``. The
    detector's batch-norm epsilon and the covariance convention come from ``protocol``."""
    detector = load_i3d(i3d_path, bn_eps=protocol.get("i3d_bn_eps") or 1e-3)
    if not Path(reference).exists():
        if datamodule is None:
            raise FileNotFoundError(
                f"metrics.reference_stats: {reference} does not exist and no data is configured"
            )
        clips = reference_statistics(detector, real_videos(datamodule), num_frames, Path(reference), protocol)
        log.info("reference statistics of %d real validation clips cached at %s", clips, reference)
    real = FeatureStatistics.load(reference, expected_protocol=protocol)
    metric = FrechetVideoDistance(real.mu.numel(), reference=real, covariance=protocol["covariance"])
    for record in records:
        video = fvd_preprocess(read_video(record.path).unsqueeze(0), num_frames=num_frames)
        metric.update(detector(video).double(), real=False)
    return float(metric.compute()), real.count


def evaluate_generation(
    module: Any,
    cfg: Any,
    ckpt_path: Path,
    checkpoint: LoadedCheckpoint,
    out_dir: Path,
    datamodule: Any = None,
) -> dict[str, float]:
    """Generate, score, and write ``videos/``, ``metrics.json`` and ``report.html`` into ``out_dir``."""
    gen, metrics_cfg = cfg.generation, cfg.metrics
    if not gen.prompts_file:
        raise ValueError(
            "generation.prompts_file: no prompts to evaluate (the checkpoint's run names none); give a .txt "
            "or .jsonl file"
        )
    load_weights(module, checkpoint)
    prompts = read_prompts(gen.prompts_file)[: gen.max_prompts or None]
    records = generate_videos(
        module,
        prompts,
        out_dir,
        videos_per_prompt=gen.videos_per_prompt,
        batch_size=gen.batch_size,
        num_frames=gen.num_frames,
        height=gen.height,
        width=gen.width,
        num_steps=gen.num_steps,
        guidance_scale=gen.guidance_scale,
        base_seed=gen.seed,
        use_ema=gen.use_ema,
    )
    manifest: dict[str, Any] = {
        "checkpoint": str(ckpt_path.resolve()),
        "checkpoint_sha256": checkpoint.sha256,
        "checkpoint_format": checkpoint.format,
        "global_step": checkpoint.meta.get("global_step"),
        "vae_hash": module.vae_hash,
        "prompts_file": str(gen.prompts_file),
        "num_prompts": len(prompts),
        "num_videos": len(records),
        "videos_per_prompt": gen.videos_per_prompt,
        "seeds": [r.seed for r in records],
        "frames": gen.num_frames,
        "height": gen.height,
        "width": gen.width,
        "objective": repr(module.objective),
        "sampler": sampler_name(module.objective),
        "num_steps": gen.num_steps,
        "guidance_scale": gen.guidance_scale,
        "ema": gen.use_ema,
        "config": getattr(module, "run_config", {}),
    }
    metrics: dict[str, float] = {}
    per_prompt: dict[str, float] | None = None
    specs = [prompts[r.prompt_idx] for r in records]
    verdicts: list[dict[str, Any] | None] = [None] * len(records)
    if metrics_cfg.get("attributes", True):
        scores, verdicts = score_videos([read_frames(r.path) for r in records], specs)
        metrics.update(scores)
        if scores:
            manifest["attributes"] = attribute_protocol()
            write_verdicts(out_dir / "attributes.jsonl", records, specs, verdicts)
    if metrics_cfg.clip_path:
        aggregation = metrics_cfg.get("clip_aggregation", "per_video")
        overall, per_prompt = clip_metrics(metrics_cfg.clip_path, records, len(prompts), aggregation)
        metrics.update(overall)
        manifest["clip_model_sha256"] = checkpoint_hash(metrics_cfg.clip_path)
        manifest["clip_score_aggregation"] = aggregation
    if metrics_cfg.i3d_path and metrics_cfg.reference_stats:
        protocol = fvd_protocol(
            metrics_cfg.i3d_path, metrics_cfg.fvd_frames, getattr(datamodule, "val_shards", None),
            bn_eps=metrics_cfg.get("i3d_bn_eps", 1e-3),
            covariance=metrics_cfg.get("fvd_covariance", "unbiased"),
        )
        metrics["fvd"], reference_clips = fvd_metric(
            metrics_cfg.i3d_path,
            metrics_cfg.reference_stats,
            records,
            metrics_cfg.fvd_frames,
            protocol,
            datamodule,
        )
        manifest["fvd"] = {
            **protocol,
            "reference_stats": str(metrics_cfg.reference_stats),
            "reference_clips": reference_clips,
        }
    elif metrics_cfg.i3d_path or metrics_cfg.reference_stats:
        raise ValueError("metrics: FVD needs both metrics.i3d_path and metrics.reference_stats")
    write_metrics(out_dir, metrics, manifest)
    write_report(out_dir, records, metrics, manifest, per_prompt_clip=per_prompt, verdicts=verdicts,
                 groups=[s.group for s in specs])
    log.info(
        "stage-2 evaluation of %s: %s (videos, metrics.json, report.html in %s)", ckpt_path, metrics, out_dir
    )
    return metrics
