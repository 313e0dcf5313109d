"""Clip sampling (which source frames form a clip) and the resize/crop transform to (C, T, H, W) in [-1, 1].

Index maths: a clip of ``num_frames`` frames takes offsets ``floor(i * step)`` for ``i < num_frames``
from a start frame, where ``step = frame_stride`` or ``step = source_fps / target_fps`` (resampling
to ``target_fps``; steps below 1 repeat frames). The clip needs ``offsets[-1] + 1`` source frames.
Videos shorter than that follow the short policy: ``skip`` raises ClipTooShortError (counted as a
skipped sample by the pipeline), ``pad`` repeats the last frame, ``loop`` wraps around to frame 0.

Variable frame rate: with ``target_fps`` and frame times that stray from a constant rate, frames are
chosen by time instead (``clip_indices_by_time``): clip frame ``i`` is the last frame shown at
``start + i / target_fps``, ``start`` being the time of one of the frames a whole clip fits after.

Resizing crops the source window that maps onto the target after a shorter-side resize, then resizes
only that window (less work than resizing the whole frame), in uint8 channels-last with bilinear
filtering and antialiasing when downscaling; the float conversion to [-1, 1] is one fused copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from vdm.utils.frames import uint8_to_float

ShortPolicy = Literal["skip", "pad", "loop"]
StartMode = Literal["random", "center"]
SHORT_POLICIES: tuple[str, ...] = ("skip", "pad", "loop")
START_MODES: tuple[str, ...] = ("random", "center")
IMAGE_MODES: tuple[str, ...] = ("repeat", "single")


class ClipError(ValueError):
    """A sample that cannot give the requested clip (too short, unknown fps); skipped by the pipeline."""


class ClipTooShortError(ClipError):
    """The video has fewer frames than the clip needs and the short policy is ``skip``."""


@dataclass(frozen=True)
class ClipSpec:
    """How to cut clips: frame count and spacing, start choice, short-video and image handling, crop."""

    num_frames: int
    frame_stride: int = 1
    target_fps: float | None = None
    start: StartMode = "random"
    short_policy: ShortPolicy = "skip"
    image_mode: Literal["repeat", "single"] = "repeat"
    crop: StartMode = "center"
    # False: crop at the source resolution (scaled up only when the source is smaller than the crop)
    resize: bool = True

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {self.frame_stride}")
        if self.target_fps is not None and self.target_fps <= 0:
            raise ValueError(f"target_fps must be > 0 or None, got {self.target_fps}")
        for name, value, allowed in (
            ("start", self.start, START_MODES),
            ("crop", self.crop, START_MODES),
            ("short_policy", self.short_policy, SHORT_POLICIES),
            ("image_mode", self.image_mode, IMAGE_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def frame_step(
    frame_stride: int = 1, target_fps: float | None = None, source_fps: float | None = None
) -> float:
    """Source frames advanced per clip frame: the stride, or source_fps / target_fps when resampling."""
    if target_fps is None:
        return float(frame_stride)
    if not source_fps or source_fps <= 0:
        raise ClipError(f"target_fps={target_fps} needs the source fps, which is unknown ({source_fps!r})")
    return float(source_fps) / float(target_fps)


def clip_offsets(num_frames: int, step: float) -> np.ndarray:
    """(num_frames,) int64 offsets floor(i * step) from the clip start (tolerant to float error)."""
    return np.floor(np.arange(num_frames, dtype=np.float64) * step + 1e-9).astype(np.int64)


def frames_needed(num_frames: int, step: float) -> int:
    """Source frames a clip of ``num_frames`` at ``step`` spans."""
    return int(clip_offsets(num_frames, step)[-1]) + 1


def clip_indices(
    num_source_frames: int,
    num_frames: int,
    *,
    frame_stride: int = 1,
    target_fps: float | None = None,
    source_fps: float | None = None,
    start: StartMode = "random",
    short_policy: ShortPolicy = "skip",
    rng: np.random.Generator | None = None,
) -> tuple[list[int], float]:
    """Source frame indices of one clip and the clip's effective fps.

    ``start="random"`` draws the start from ``rng`` (required) uniformly over every start that fits;
    ``"center"`` centres the clip. The effective fps is ``source_fps / step`` (0.0 when unknown).
    """
    step = frame_step(frame_stride, target_fps, source_fps)
    offsets = clip_offsets(num_frames, step)
    span = int(offsets[-1]) + 1
    fps = float(source_fps) / step if source_fps else 0.0
    if num_source_frames < 1:
        raise ClipTooShortError(f"video has {num_source_frames} frames")
    if span > num_source_frames:
        if short_policy == "skip":
            raise ClipTooShortError(
                f"video has {num_source_frames} frames, clip needs {span} "
                f"({num_frames} frames at step {step:g}); short_policy='skip'"
            )
        if short_policy == "pad":
            return np.minimum(offsets, num_source_frames - 1).tolist(), fps
        if short_policy == "loop":
            return (offsets % num_source_frames).tolist(), fps
        raise ValueError(f"short_policy must be one of {SHORT_POLICIES}, got {short_policy!r}")
    max_start = num_source_frames - span
    if start == "center":
        first = max_start // 2
    elif start == "random":
        if rng is None:
            raise ValueError("start='random' needs a seeded numpy Generator (rng=)")
        first = int(rng.integers(0, max_start + 1))
    else:
        raise ValueError(f"start must be one of {START_MODES}, got {start!r}")
    return (offsets + first).tolist(), fps


def is_variable_rate(timestamps: np.ndarray | None) -> bool:
    """True when frame intervals differ by more than half the median interval (VFR, or dropped frames)."""
    if timestamps is None or len(timestamps) < 3:
        return False
    intervals = np.diff(np.asarray(timestamps, dtype=np.float64))
    median = float(np.median(intervals))
    return median > 0 and float(intervals.max() - intervals.min()) > 0.5 * median


def timestamp_fps(timestamps: np.ndarray) -> float:
    """Average frame rate measured from frame times: (frames - 1) / (last - first); 0.0 if unknown."""
    span = float(timestamps[-1] - timestamps[0]) if len(timestamps) > 1 else 0.0
    return (len(timestamps) - 1) / span if span > 0 else 0.0


def clip_indices_by_time(
    timestamps: np.ndarray,
    num_frames: int,
    *,
    target_fps: float,
    start: StartMode = "random",
    short_policy: ShortPolicy = "skip",
    rng: np.random.Generator | None = None,
) -> tuple[list[int], float]:
    """Source frame indices of one clip sampled at ``target_fps`` by frame time, and ``target_fps``.

    ``timestamps``: (N,) increasing presentation times in seconds. Starts and short policies follow
    ``clip_indices``: a clip needs ``(num_frames - 1) / target_fps`` seconds after its first frame.
    """
    times = np.asarray(timestamps, dtype=np.float64) - float(timestamps[0])
    offsets = np.arange(num_frames, dtype=np.float64) / float(target_fps)
    starts = times[times + offsets[-1] <= times[-1] + 1e-9]
    if len(starts) == 0:
        if short_policy == "skip":
            raise ClipTooShortError(
                f"video lasts {times[-1]:.3f} s, clip needs {offsets[-1]:.3f} s "
                f"({num_frames} frames at {target_fps:g} fps); short_policy='skip'"
            )
        if short_policy == "loop":
            period = times[-1] * len(times) / max(len(times) - 1, 1) or 1.0 / float(target_fps)
            offsets = offsets % period
        elif short_policy != "pad":
            raise ValueError(f"short_policy must be one of {SHORT_POLICIES}, got {short_policy!r}")
        first = 0.0
    elif start == "center":
        first = float(starts[(len(starts) - 1) // 2])
    elif start == "random":
        if rng is None:
            raise ValueError("start='random' needs a seeded numpy Generator (rng=)")
        first = float(starts[int(rng.integers(0, len(starts)))])
    else:
        raise ValueError(f"start must be one of {START_MODES}, got {start!r}")
    indices = np.searchsorted(times, first + offsets + 1e-9, side="right") - 1
    return indices.tolist(), float(target_fps)


def crop_window(
    height: int,
    width: int,
    out_height: int,
    out_width: int,
    *,
    crop: StartMode = "center",
    rng: np.random.Generator | None = None,
    resize: bool = True,
) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of the source window that a shorter-side resize + crop keeps; without
    ``resize`` the window is the crop itself at the source resolution (e.g. VAE training on patches), unless
    the source is smaller than the crop."""
    scale = max(out_height / height, out_width / width)
    if not resize:
        scale = max(scale, 1.0)
    crop_h = min(height, max(1, round(out_height / scale)))
    crop_w = min(width, max(1, round(out_width / scale)))
    if crop == "center":
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w
    if rng is None:
        raise ValueError("crop='random' needs a seeded numpy Generator (rng=)")
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return top, left, crop_h, crop_w


def resize_crop_uint8(
    frames: np.ndarray | torch.Tensor,
    height: int,
    width: int,
    *,
    crop: StartMode = "center",
    rng: np.random.Generator | None = None,
    resize: bool = True,
) -> torch.Tensor:
    """(T, h, w, 3) uint8 RGB frames -> (T, 3, height, width) uint8 (channels-last strides, may be a view).

    Shorter side resized to cover (height, width), then cropped (centre or random). Bilinear, with
    antialias when downscaling. Without ``resize``: cropped at the source resolution.
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {tuple(x.shape)} {x.dtype}")
    h, w = x.shape[1], x.shape[2]
    top, left, crop_h, crop_w = crop_window(h, w, height, width, crop=crop, rng=rng, resize=resize)
    x = x[:, top : top + crop_h, left : left + crop_w].permute(0, 3, 1, 2)  # T 3 h w
    if (crop_h, crop_w) != (height, width):
        downscale = crop_h > height or crop_w > width
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=downscale)
    return x


def to_unit_range(frames: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(T, 3, H, W) uint8 -> (3, T, H, W) float32 in [-1, 1] (0 -> -1, 255 -> 1).

    Converted one frame at a time so each frame's float copy is still in cache when it is scaled.
    ``out`` may be a preallocated (3, T, H, W) float32 tensor (e.g. one sample of a batch).
    """
    num, _, height, width = frames.shape
    if out is None:
        out = torch.empty((3, num, height, width), dtype=torch.float32)
    elif tuple(out.shape) != (3, num, height, width) or out.dtype != torch.float32:
        raise ValueError(
            f"out must be (3, {num}, {height}, {width}) float32, got {tuple(out.shape)} {out.dtype}"
        )
    for t in range(num):
        uint8_to_float(frames[t], out=out[:, t])
    return out


def resize_crop(
    frames: np.ndarray | torch.Tensor,
    height: int,
    width: int,
    *,
    crop: StartMode = "center",
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """(T, h, w, 3) uint8 RGB frames -> (3, T, height, width) float32 in [-1, 1] (see resize_crop_uint8)."""
    return to_unit_range(resize_crop_uint8(frames, height, width, crop=crop, rng=rng))


def num_clip_frames(kind: str, spec: ClipSpec, num_frames: int | None = None) -> int:
    """Frames a sample of ``kind`` ("video" or "image") yields; images give 1 in ``single`` mode."""
    target = spec.num_frames if num_frames is None else num_frames
    return 1 if kind == "image" and spec.image_mode == "single" else target
