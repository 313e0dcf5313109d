"""Metric hooks in training: CLIP score and FVD of generated samples (stage 2), reconstruction FVD (stage 1).

Both are shared by all ranks. ``GenerationMetrics`` deals the held-out videos out round-robin, each rank
samples and scores its share with its own copy of the EMA model, and the metric states (float64 sums)
are merged with one collective at the end, so no rank works while the others wait. ``ReconstructionFVD``
rides on the validation loop, which the data module already splits across ranks.
The detectors (I3D, CLIP) load lazily from local files, live outside the LightningModule (never in a
checkpoint) and use the protocol of ``evaluate.py`` (``vdm.lightning.generation_eval``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from vdm.evaluation import PromptSpec, video_seed
from vdm.lightning.callbacks import select_prompts
from vdm.lightning.generation_eval import fvd_protocol, real_videos, update_features
from vdm.metrics.clip_score import CLIPScore, CLIPScorer
from vdm.metrics.frechet import FeatureStatistics, FrechetVideoDistance, frechet_distance, save_statistics
from vdm.metrics.i3d import NUM_CLASSES, fvd_preprocess, load_i3d

log = logging.getLogger(__name__)


def _quantize(videos: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit values a saved video would hold, as float in [-1, 1] (what evaluate.py scores)."""
    return ((videos.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def _publish(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Send to every logger at the current step and expose to monitors (``trainer.callback_metrics``)."""
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(value)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class GenerationMetrics(L.Callback):
    """Every ``every_n_steps`` steps: sample ``videos_per_prompt`` videos per held-out prompt with the EMA
    weights, then log ``val/clip_score`` and ``val/clipsim`` (given ``clip_path``) and ``val/fvd`` (given
    ``i3d_path``; ``reference_stats`` is where the real statistics are cached). Off while both are null.

    Seeds follow ``vdm.evaluation.video_seed`` (per video, independent of the batch and the rank), so the
    numbers at different steps differ only through the weights. Missing reference statistics are computed
    once from the validation split, shared by all ranks, and cached at ``reference_stats`` with their
    protocol. Samples are quantized to 8 bits before scoring but not video-coded, so FVD here is close to,
    not identical with, ``evaluate.py``'s score of the written mp4s.
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
    ) -> None:
        if min(every_n_steps, videos_per_prompt, batch_size, num_steps) < 1:
            raise ValueError("every_n_steps, videos_per_prompt, batch_size and num_steps must be >= 1")
        if i3d_path and not reference_stats:
            raise ValueError(
                "GenerationMetrics: FVD (i3d_path) needs reference_stats, a path to cache them at"
            )
        self.clip_path, self.i3d_path, self.reference_stats = clip_path, i3d_path, reference_stats
        # a disabled hook never reads its prompts file (the default config names one that may not exist)
        self.prompts = (
            select_prompts(prompts, prompts_file, num_prompts or None, owner="GenerationMetrics")
            if self.enabled
            else list(prompts or [])
        )
        self.every_n_steps, self.videos_per_prompt, self.batch_size = (
            every_n_steps,
            videos_per_prompt,
            batch_size,
        )
        self.shape = (num_frames, height, width)
        self.num_steps, self.guidance_scale, self.seed = num_steps, guidance_scale, seed
        self.fvd_frames = fvd_frames
        self._clip: CLIPScorer | None = None
        self._i3d: torch.nn.Module | None = None
        self._reference = None
        self.last_metrics: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        """Off while neither detector's weights are given (the default: nothing can be downloaded)."""
        return bool(self.clip_path or self.i3d_path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.enabled and trainer.global_step % self.every_n_steps == 0 and not trainer.fast_dev_run:
            self.run(trainer, pl_module)

    def items(self, rank: int, world_size: int) -> list[tuple[int, int, int]]:
        """This rank's (prompt index, sample index, seed) share of all videos, dealt round-robin."""
        everything = [
            (i, s, video_seed(PromptSpec(self.prompts[i]), i, s, self.seed))
            for i in range(len(self.prompts))
            for s in range(self.videos_per_prompt)
        ]
        return everything[rank::world_size]

    def _detectors(self, device: torch.device) -> None:
        if self.clip_path and self._clip is None:
            self._clip = CLIPScorer(self.clip_path).to(device)
        if self.i3d_path and self._i3d is None:
            self._i3d = load_i3d(self.i3d_path).to(device)

    def _reference_statistics(self, trainer: L.Trainer, device: torch.device) -> Any:
        datamodule = trainer.datamodule
        protocol = fvd_protocol(self.i3d_path, self.fvd_frames, getattr(datamodule, "val_shards", None))
        path = Path(self.reference_stats)
        if not path.exists():  # every rank sees the same filesystem state here: no rank skips the collectives
            stats = None
            for videos in real_videos(datamodule):
                stats = update_features(self._i3d, videos.to(device), self.fvd_frames, stats)
            stats = (
                stats if stats is not None else FeatureStatistics(NUM_CLASSES).to(device)
            )  # a rank with no clips
            gaussian = stats.compute()  # merges all ranks
            if trainer.is_global_zero:
                save_statistics(gaussian, path, protocol)
                log.info("FVD reference statistics of %d real clips cached at %s", gaussian.count, path)
            trainer.strategy.barrier("fvd_reference")
        return FeatureStatistics.load(path, expected_protocol=protocol)

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        device = pl_module.device
        self._detectors(device)
        if self.i3d_path and self._reference is None:
            self._reference = self._reference_statistics(trainer, device)
        clip = CLIPScore().to(device) if self._clip is not None else None
        fvd = (
            FrechetVideoDistance(NUM_CLASSES, reference=self._reference).to(device)
            if self._i3d is not None
            else None
        )
        mine = self.items(trainer.global_rank, trainer.world_size)
        # every rank makes the same number of sampling calls (ZeRO-3 gathers weights collectively inside
        # them): a rank with one video fewer samples a stand-in row that is not scored
        share = -(-len(self.prompts) * self.videos_per_prompt // trainer.world_size)
        real = len(mine)
        mine = mine + [self.items(0, 1)[0]] * (share - real)
        was_training = pl_module.training
        pl_module.eval()
        try:
            for start in range(0, len(mine), self.batch_size):
                batch = mine[start : start + self.batch_size]
                prompts = [self.prompts[i] for i, _, _ in batch]
                videos = _quantize(
                    pl_module.sample(
                        prompts,
                        *self.shape,
                        num_steps=self.num_steps,
                        guidance_scale=self.guidance_scale,
                        seed=[s for _, _, s in batch],
                    )
                )
                keep = max(0, min(len(batch), real - start))
                videos, prompts = videos[:keep], prompts[:keep]
                if clip is not None and keep:
                    clip.update(self._clip(videos, prompts))
                if fvd is not None and keep:
                    features = self._i3d(fvd_preprocess(videos, num_frames=self.fvd_frames))
                    fvd.update(features.double(), real=False)
        finally:
            pl_module.train(was_training)
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


class ReconstructionFVD(L.Callback):
    """Stage 1: reconstruction FVD (``val/rfvd``) between the held-out clips and their reconstructions.

    Reads the ``(x, x_hat)`` that ``VAEModule.validation_step`` returns. The real side is computed during
    the first full validation and kept (the validation split is fixed), so later validations only run I3D
    on the reconstructions. With ``every_n_val_epochs`` > 1 it scores every n-th validation only. Off while
    ``i3d_path`` is null.
    """

    def __init__(self, i3d_path: str | None, fvd_frames: int = 16, every_n_val_epochs: int = 1) -> None:
        if every_n_val_epochs < 1:
            raise ValueError(f"every_n_val_epochs must be >= 1, got {every_n_val_epochs}")
        self.i3d_path, self.fvd_frames, self.every_n_val_epochs = i3d_path, fvd_frames, every_n_val_epochs
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
                self._i3d = load_i3d(self.i3d_path).to(pl_module.device)
            self._fake = FeatureStatistics(NUM_CLASSES).to(pl_module.device)
            if not self._real_done:
                self._real = FeatureStatistics(NUM_CLASSES).to(pl_module.device)

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
