"""Seeded, resumable generation of evaluation videos to mp4, reading them back, and ``metrics.json``.

No Hydra and no Trainer. Generation is resumable because every video has a deterministic seed and a
fixed file name; a file that exists is kept and scored as it is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av  # noqa: F401  (PyAV must be imported before any decord import)
import numpy as np
import torch
from tqdm.auto import tqdm

from vdm.data.encode import EncodeOptions, encode_frames
from vdm.eval.prompts import PromptSpec, video_seed
from vdm.utils.frames import from_uint8_frames, to_uint8_frames
from vdm.utils.io import atomic_write

log = logging.getLogger(__name__)

#: the callbacks' encoder settings: same files as the training-time samples
ENCODE_OPTIONS = EncodeOptions(keyframe_interval=8, crf=18)


@dataclass(frozen=True)
class GeneratedVideo:
    """One generated (or kept) video file and the seed that made it."""

    path: Path
    prompt: str
    prompt_idx: int
    sample_idx: int
    seed: int


def video_path(out_dir: str | Path, prompt_idx: int, sample_idx: int) -> Path:
    """``out_dir/videos/p{prompt_idx:04d}_s{sample_idx:02d}.mp4``."""
    return Path(out_dir) / "videos" / f"p{prompt_idx:04d}_s{sample_idx:02d}.mp4"


@torch.no_grad()
def generate_videos(
    module: Any,
    prompts: Sequence[PromptSpec | str],
    out_dir: str | Path,
    *,
    videos_per_prompt: int,
    batch_size: int,
    num_frames: int,
    height: int,
    width: int,
    num_steps: int,
    guidance_scale: float,
    base_seed: int,
    use_ema: bool = True,
    fps: float = 8,
) -> list[GeneratedVideo]:
    """Generate ``videos_per_prompt`` mp4s per prompt with ``module.sample``; existing files are kept.

    Returns one record per video in (prompt, sample) order, kept files included. The missing videos are
    sampled ``batch_size`` at a time with one seed per video (see :func:`video_seed`), so a video's content
    does not depend on ``batch_size`` or on which files a resumed run still needs.
    """
    if videos_per_prompt < 1 or batch_size < 1:
        raise ValueError(
            f"videos_per_prompt and batch_size must be >= 1, got {videos_per_prompt} and {batch_size}"
        )
    specs = [p if isinstance(p, PromptSpec) else PromptSpec(p) for p in prompts]
    (Path(out_dir) / "videos").mkdir(parents=True, exist_ok=True)
    records = [
        GeneratedVideo(video_path(out_dir, i, s), spec.prompt, i, s, video_seed(spec, i, s, base_seed))
        for i, spec in enumerate(specs)
        for s in range(videos_per_prompt)
    ]
    todo = [r for r in records if not r.path.is_file()]
    if len(todo) < len(records):
        log.info("keeping %d existing videos in %s", len(records) - len(todo), out_dir)
    was_training = getattr(module, "training", False)
    if todo and hasattr(module, "eval"):
        module.eval()
    try:
        with tqdm(total=len(todo), desc="generating videos", unit="video", disable=not todo) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                videos = module.sample(
                    [r.prompt for r in batch],
                    num_frames,
                    height,
                    width,
                    num_steps=num_steps,
                    guidance_scale=guidance_scale,
                    seed=[r.seed for r in batch],
                    use_ema=use_ema,
                )
                for record, video in zip(batch, videos):
                    # a crash mid-write must not leave a truncated mp4 that a resumed run would keep
                    atomic_write(record.path, encode_frames(to_uint8_frames(video), fps, ENCODE_OPTIONS))
                bar.update(len(batch))
    finally:
        if was_training:
            module.train()
    return records


def read_frames(path: str | Path) -> np.ndarray:
    """Decode every frame of an mp4 with PyAV: (T, H, W, 3) uint8."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames)


def read_video(path: str | Path) -> torch.Tensor:
    """Decode every frame of an mp4 with PyAV: (3, T, H, W) float in [-1, 1]."""
    return from_uint8_frames(read_frames(path))


def write_metrics(out_dir: str | Path, metrics: dict[str, Any], manifest: dict[str, Any]) -> Path:
    """``out_dir/metrics.json`` = ``{"metrics": metrics, "protocol": manifest}`` (sorted keys, indent 2)."""
    path = Path(out_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"metrics": metrics, "protocol": manifest}, sort_keys=True, indent=2) + "\n"
    atomic_write(path, text)
    return path
