"""Metric hooks in training: CLIP score and FVD of generated samples (stage 2), reconstruction FVD (stage 1).

Both are shared by all ranks. ``GenerationMetrics`` deals the held-out videos out round-robin, each rank
samples and scores its share with its own copy of the EMA model, and the metric states (float64 sums)
are merged with one collective at the end, so no rank works while the others wait. ``ReconstructionFVD``
rides on the validation loop, which the data module already splits across ranks.
The detectors (I3D, CLIP) load lazily from local files, live outside the LightningModule (never in a
checkpoint) and use the protocol of ``evaluate.py`` (``vdm.eval.text_to_video``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from vdm.eval.attributes import AttributeCounts, score_videos
from vdm.eval.prompts import PromptSpec, read_prompts, select_prompts, video_seed
from vdm.eval.text_to_video import fvd_protocol, real_videos, update_features
from vdm.metrics.clip_score import ClipAggregation, CLIPScore, CLIPScorer
from vdm.metrics.frechet import (
    Covariance,
    FeatureStatistics,
    FrechetVideoDistance,
    frechet_distance,
    save_statistics,
)
from vdm.metrics.i3d import NUM_CLASSES, fvd_preprocess, load_i3d
from vdm.utils.frames import quantize, to_uint8_frames

log = logging.getLogger(__name__)



def _publish(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Send to every logger at the current step and expose to monitors (``trainer.callback_metrics``)."""
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(value)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class SampledMetrics(L.Callback):
    """Base of the hooks that sample prompts with the EMA weights every ``every_n_steps`` steps and score
    the videos: the prompts are ``specs``, each video has its own seed (``vdm.eval.prompts.video_seed``,
    independent of the batch and the rank), and the videos are dealt round-robin across ranks."""

    def __init__(self, every_n_steps: int, specs: list[PromptSpec], videos_per_prompt: int, batch_size: int,
                 num_frames: int, height: int, width: int, num_steps: int, guidance_scale: float,
                 seed: int) -> None:
        if min(every_n_steps, videos_per_prompt, batch_size, num_steps) < 1:
            raise ValueError("every_n_steps, videos_per_prompt, batch_size and num_steps must be >= 1")
        self.specs, self.prompts = specs, [spec.prompt for spec in specs]
        self.every_n_steps, self.videos_per_prompt = every_n_steps, videos_per_prompt
        self.batch_size = batch_size
        self.shape = (num_frames, height, width)
        self.num_steps, self.guidance_scale, self.seed = num_steps, guidance_scale, seed
        self.last_metrics: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.specs)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.enabled and trainer.global_step % self.every_n_steps == 0 and not trainer.fast_dev_run:
            self.run(trainer, pl_module)  # type: ignore[attr-defined]  (each subclass scores its own way)

    def items(self, rank: int, world_size: int) -> list[tuple[int, int, int]]:
        """This rank's (prompt index, sample index, seed) share of all videos, dealt round-robin."""
        everything = [
            (i, s, video_seed(spec, i, s, self.seed))
            for i, spec in enumerate(self.specs)
            for s in range(self.videos_per_prompt)
        ]
        return everything[rank::world_size]

    def _share(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[tuple[list, torch.Tensor]]:
        """Sample this rank's share of the videos with the EMA weights: yields (items, videos in [-1, 1]
        quantized to 8 bits) per batch, stand-in rows dropped."""
        mine = self.items(trainer.global_rank, trainer.world_size)
        # every rank makes the same number of sampling calls (ZeRO-3 gathers weights collectively inside
        # them): a rank with one video fewer samples a stand-in row that is not scored
        share = -(-len(self.specs) * self.videos_per_prompt // trainer.world_size)
        real = len(mine)
        mine = mine + [self.items(0, 1)[0]] * (share - real)
        was_training = pl_module.training
        pl_module.eval()
        try:
            for start in range(0, len(mine), self.batch_size):
                batch = mine[start : start + self.batch_size]
                videos = quantize(
                    pl_module.sample(
                        [self.prompts[i] for i, _, _ in batch],
                        *self.shape,
                        num_steps=self.num_steps,
                        guidance_scale=self.guidance_scale,
                        seed=[s for _, _, s in batch],
                    )
                )
                keep = max(0, min(len(batch), real - start))
                if keep:
                    yield batch[:keep], videos[:keep]
        finally:
            pl_module.train(was_training)


class GenerationMetrics(SampledMetrics):
    """Every ``every_n_steps`` steps: sample ``videos_per_prompt`` videos per held-out prompt with the EMA
    weights, then log ``val/clip_score`` and ``val/clipsim`` (given ``clip_path``) and ``val/fvd`` (given
    ``i3d_path``; ``reference_stats`` is where the real statistics are cached). Off while both are null.

    The numbers at different steps differ only through the weights. Missing reference statistics are
    computed once from the validation split, shared by all ranks, and cached at ``reference_stats`` with
    their protocol. Samples are quantized to 8 bits before scoring but not video-coded, so FVD here is
    close to, not identical with, ``evaluate.py``'s score of the written mp4s.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        prompts_file: str | None = None,
        prompts: list[str] | None = None,
        num_prompts: int | None = None,
        videos_per_prompt: int = 1,
        batch_size: int = 4,
        num_frames: int = 17,
        height: int = 256,
        width: int = 256,
        num_steps: int = 25,
        guidance_scale: float = 5.0,
        seed: int = 0,
        clip_path: str | None = None,
        i3d_path: str | None = None,
        reference_stats: str | None = None,
        fvd_frames: int = 16,
        i3d_bn_eps: float = 1e-3,
        fvd_covariance: Covariance = "unbiased",
        clip_aggregation: ClipAggregation = "per_video",
    ) -> None:
        if i3d_path and not reference_stats:
            raise ValueError(
                "GenerationMetrics: FVD (i3d_path) needs reference_stats, a path to cache them at"
            )
        # a disabled hook never reads its prompts file (the default config names one that may not exist)
        enabled = bool(clip_path or i3d_path)
        texts = (
            select_prompts(prompts, prompts_file, num_prompts or None, owner="GenerationMetrics")
            if enabled
            else list(prompts or [])
        )
        super().__init__(every_n_steps, [PromptSpec(t) for t in texts], videos_per_prompt, batch_size,
                         num_frames, height, width, num_steps, guidance_scale, seed)
        self.clip_path, self.i3d_path, self.reference_stats = clip_path, i3d_path, reference_stats
        self.fvd_frames = fvd_frames
        # the metric conventions (README: which published numbers each is comparable with)
        self.i3d_bn_eps, self.fvd_covariance = i3d_bn_eps, fvd_covariance
        self.clip_aggregation = clip_aggregation
        self._clip: CLIPScorer | None = None
        self._i3d: torch.nn.Module | None = None
        self._reference = None

    @property
    def enabled(self) -> bool:
        """Off while neither detector's weights are given (the default: nothing can be downloaded)."""
        return bool(self.clip_path or self.i3d_path)

    def _detectors(self, device: torch.device) -> None:
        if self.clip_path and self._clip is None:
            self._clip = CLIPScorer(self.clip_path).to(device)
        if self.i3d_path and self._i3d is None:
            self._i3d = load_i3d(self.i3d_path, bn_eps=self.i3d_bn_eps).to(device)

    def _reference_statistics(self, trainer: L.Trainer, device: torch.device) -> Any:
        datamodule = trainer.datamodule
        protocol = fvd_protocol(self.i3d_path, self.fvd_frames, getattr(datamodule, "val_shards", None),
                                bn_eps=self.i3d_bn_eps, covariance=self.fvd_covariance)
        path = Path(self.reference_stats)
        if not path.exists():  # every rank sees the same filesystem state here: no rank skips the collectives
            stats = None
            for videos in real_videos(datamodule):
                stats = update_features(
                    self._i3d, videos.to(device), self.fvd_frames, stats, self.fvd_covariance
                )
            if stats is None:  # a rank with no clips
                stats = FeatureStatistics(NUM_CLASSES, covariance=self.fvd_covariance).to(device)
            gaussian = stats.compute()  # merges all ranks
            if trainer.is_global_zero:
                save_statistics(gaussian, path, protocol)
                log.info("FVD reference statistics of %d real clips cached at %s", gaussian.count, path)
            trainer.strategy.barrier("fvd_reference")
        return FeatureStatistics.load(path, expected_protocol=protocol)

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Sample, score and log (every rank takes part); returns the logged metrics."""
        device = pl_module.device
        self._detectors(device)
        if self.i3d_path and self._reference is None:
            self._reference = self._reference_statistics(trainer, device)
        clip = CLIPScore(aggregation=self.clip_aggregation).to(device) if self._clip is not None else None
        fvd = None
        if self._i3d is not None:
            fvd = FrechetVideoDistance(NUM_CLASSES, reference=self._reference, covariance=self.fvd_covariance)
            fvd = fvd.to(device)
        for batch, videos in self._share(trainer, pl_module):
            if clip is not None:
                clip.update(self._clip(videos, [self.prompts[i] for i, _, _ in batch]))
            if fvd is not None:
                features = self._i3d(fvd_preprocess(videos, num_frames=self.fvd_frames))
                fvd.update(features.double(), real=False)
        metrics: dict[str, float] = {}
        if clip is not None:  # compute() merges the ranks' sums: every rank calls it
            values = clip.compute()
            metrics.update(
                {"val/clip_score": float(values["clip_score"]), "val/clipsim": float(values["clipsim"])}
            )
        if fvd is not None:
            metrics["val/fvd"] = float(fvd.compute())
        _publish(trainer, metrics)
        self.last_metrics = metrics
        return metrics


class AttributeMetrics(SampledMetrics):
    """Every ``every_n_steps`` steps: sample the evaluation prompts (``prompts_file``, jsonl with scene
    attributes and seen/held-out groups) with the EMA weights and log the weight-free attribute scores
    ``val/attr_<name>`` and ``val/attr_<group>_<name>`` (background, count, color, shape, motion, speed,
    all), so a run shows when the model starts drawing the prompted shapes and motions, not only a loss.

    Uses the prompts' own seeds, as ``evaluate.py`` does. The correct/scored counts are summed over ranks.
    With ``history_file`` each evaluation is also appended there as a JSON line (step, seconds of training
    so far, scores) for plots of accuracy against steps or time. Off while ``prompts_file`` is null or
    ``every_n_steps`` is 0.
    """

    def __init__(self, every_n_steps: int = 500, prompts_file: str | None = None,
                 num_prompts: int | None = None, videos_per_prompt: int = 1, batch_size: int = 8,
                 num_frames: int = 9, height: int = 64, width: int = 64, num_steps: int = 25,
                 guidance_scale: float = 4.0, seed: int = 0, history_file: str | None = None) -> None:
        on = bool(prompts_file) and every_n_steps > 0
        specs = read_prompts(prompts_file)[: num_prompts or None] if on else []
        super().__init__(max(every_n_steps, 1), specs, videos_per_prompt, batch_size, num_frames, height,
                         width, num_steps, guidance_scale, seed)
        self.history_file = history_file
        self._train_seconds = 0.0
        self._since: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # training wall time (steps and data loading), the scoring itself left out
        if self._since is not None:
            self._train_seconds += time.perf_counter() - self._since
        super().on_train_batch_end(trainer, pl_module, *args)
        self._since = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self._train_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_seconds = float(state_dict.get("train_seconds", 0.0))

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        groups = sorted({spec.group for spec in self.specs if spec.group})
        counts = AttributeCounts(groups)
        for batch, videos in self._share(trainer, pl_module):
            frames = [to_uint8_frames(video) for video in videos]
            _, verdicts = score_videos(frames, [self.specs[i] for i, _, _ in batch])
            for (i, _, _), verdict in zip(batch, verdicts):
                counts.add(verdict, self.specs[i].group)
        totals = counts.tensor(pl_module.device)
        if trainer.world_size > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        metrics = counts.metrics(totals)
        _publish(trainer, metrics)
        if self.history_file and trainer.is_global_zero:
            row = {"step": trainer.global_step, "train_seconds": round(self._train_seconds, 1), **metrics}
            with open(self.history_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        self.last_metrics = metrics
        return metrics


class ReconstructionFVD(L.Callback):
    """Stage 1: reconstruction FVD (``val/rfvd``) between the held-out clips and their reconstructions.

    Reads the ``(x, x_hat)`` that ``VAEModule.validation_step`` returns. The real side is computed during
    the first full validation and kept (the validation split is fixed), so later validations only run I3D
    on the reconstructions. With ``every_n_val_epochs`` > 1 it scores every n-th validation only. Off while
    ``i3d_path`` is null.
    """

    def __init__(self, i3d_path: str | None, fvd_frames: int = 16, every_n_val_epochs: int = 1,
                 i3d_bn_eps: float = 1e-3, fvd_covariance: Covariance = "unbiased") -> None:
        if every_n_val_epochs < 1:
            raise ValueError(f"every_n_val_epochs must be >= 1, got {every_n_val_epochs}")
        self.i3d_path, self.fvd_frames, self.every_n_val_epochs = i3d_path, fvd_frames, every_n_val_epochs
        self.i3d_bn_eps, self.fvd_covariance = i3d_bn_eps, fvd_covariance
        self._i3d: torch.nn.Module | None = None
        self._real: FeatureStatistics | None = None
        self._real_done = False
        self._fake: FeatureStatistics | None = None
        self._val_count = 0
        self._active = False

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = self._val_count % self.every_n_val_epochs == 0
        self._active = bool(self.i3d_path) and not trainer.sanity_checking and due
        if not trainer.sanity_checking:
            self._val_count += 1
        if self._active:
            if self._i3d is None:
                self._i3d = load_i3d(self.i3d_path, bn_eps=self.i3d_bn_eps).to(pl_module.device)
            device, covariance = pl_module.device, self.fvd_covariance
            self._fake = FeatureStatistics(NUM_CLASSES, covariance=covariance).to(device)
            if not self._real_done:
                self._real = FeatureStatistics(NUM_CLASSES, covariance=covariance).to(device)

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        if not self._active or not isinstance(outputs, dict) or "x_hat" not in outputs:
            return
        self._fake.update(self._i3d(fvd_preprocess(outputs["x_hat"], num_frames=self.fvd_frames)).double())
        if not self._real_done:
            self._real.update(self._i3d(fvd_preprocess(outputs["x"], num_frames=self.fvd_frames)).double())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active:
            return
        real, fake = self._real.compute(), self._fake.compute()  # each merges all ranks
        self._real_done = True
        value = frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
        # the same value on every rank (the statistics are merged): logged like the module's val metrics
        pl_module.log("val/rfvd", torch.tensor(value, dtype=torch.float32))
        self._active = False
