"""One raw webdataset sample -> one decoded clip; clips -> a collated batch.

A decoded clip is kept as uint8 (T, 3, H, W) until collation, which writes every clip straight into
one float32 (B, 3, T, H, W) batch tensor in [-1, 1] (in shared memory inside DataLoader workers, so
the batch reaches the training process without another copy).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vdm.data.buckets import Bucket, assign_bucket
from vdm.data.clips import (
    ClipError,
    ClipSpec,
    ClipTooShortError,
    clip_indices,
    clip_indices_by_time,
    frame_step,
    frames_needed,
    is_variable_rate,
    num_clip_frames,
    resize_crop_uint8,
    timestamp_fps,
    to_unit_range,
)
from vdm.data.decode import Backend, DecodeError, MediaInfo, open_media
from vdm.data.formats import media_key
from vdm.utils.frames import uint8_to_float


class SampleError(ValueError):
    """A raw sample lacking a media member or with unreadable caption/metadata; skipped by the pipeline."""


# failures that make the pipeline skip (and count) a sample instead of stopping
SKIPPABLE: tuple[type[BaseException], ...] = (DecodeError, ClipError, SampleError)


@dataclass
class Clip:
    """A decoded sample before collation: ``frames`` is (T, 3, H, W) uint8 of ``bucket``'s H and W."""

    bucket: Bucket
    frames: torch.Tensor
    caption: str
    key: str
    meta: dict[str, Any] = field(default_factory=dict)

    def as_sample(self) -> dict[str, Any]:
        """The contract sample: {"video": (3, T, H, W) float32 in [-1, 1], "caption", "key", "meta"}."""
        return {
            "video": to_unit_range(self.frames),
            "caption": self.caption,
            "key": self.key,
            "meta": self.meta,
        }

    def padded_copy(self) -> Clip:
        """The same clip flagged as a duplicate (meta["pad"] = True) that consumers should ignore."""
        meta = copy.deepcopy(self.meta)
        meta["pad"] = True
        return Clip(self.bucket, self.frames, self.caption, self.key, meta)


def _read_text_members(raw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    try:
        caption = raw["txt"].decode("utf-8") if "txt" in raw else ""
        info = json.loads(raw["json"]) if "json" in raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError(f"unreadable caption or metadata: {exc}") from exc
    if not isinstance(info, dict):
        raise SampleError(f"metadata .json is a {type(info).__name__}, expected an object")
    return caption, info


def plan_clip(
    info: MediaInfo,
    spec: ClipSpec,
    buckets: Sequence[Bucket],
    rng: np.random.Generator,
    timestamps: np.ndarray | None = None,
) -> tuple[Bucket, list[int], float]:
    """(bucket, source frame indices, effective fps) for media with ``info``; images give ([0], 0.0).

    ``timestamps``: the video's frame times in seconds, when known; with ``target_fps`` and a variable
    frame rate, frames are then picked by time at the rate measured from them. Raises
    ClipTooShortError when no bucket fits and the short policy is ``skip``.
    """
    by_time = spec.target_fps is not None and is_variable_rate(timestamps) and timestamp_fps(timestamps) > 0
    if by_time:
        info = dataclasses.replace(info, fps=timestamp_fps(timestamps))
    is_image = info.kind == "image"
    step = 1.0 if is_image else frame_step(spec.frame_stride, spec.target_fps, info.fps)
    allow_short = is_image or spec.short_policy != "skip"
    bucket = assign_bucket(
        buckets, info.height, info.width, info.num_frames, step=step, allow_short=allow_short
    )
    if bucket is None:
        shortest = min(frames_needed(b.num_frames, step) for b in buckets)
        raise ClipTooShortError(
            f"video has {info.num_frames} frames, the shortest bucket needs {shortest}; short_policy='skip'"
        )
    if is_image:
        return bucket, [0], 0.0
    if by_time:
        indices, fps = clip_indices_by_time(
            timestamps,
            bucket.num_frames,
            target_fps=spec.target_fps,
            start=spec.start,
            short_policy=spec.short_policy,
            rng=rng,
        )
        return bucket, indices, fps
    indices, fps = clip_indices(
        info.num_frames,
        bucket.num_frames,
        frame_stride=spec.frame_stride,
        target_fps=spec.target_fps,
        source_fps=info.fps,
        start=spec.start,
        short_policy=spec.short_policy,
        rng=rng,
    )
    return bucket, indices, fps


def decode_clip(
    raw: dict[str, Any],
    spec: ClipSpec,
    buckets: Sequence[Bucket],
    *,
    rng: np.random.Generator,
    backend: Backend = "decord",
    decode_threads: int = 1,
) -> Clip:
    """Decode a raw sample ({"__key__", "__url__", media ext: bytes, "txt", "json"}) into a Clip.

    Picks the bucket (aspect ratio, then frames), the clip indices (``spec``) and the crop; raises
    DecodeError / ClipError / SampleError for samples the pipeline should skip.
    """
    key, url = str(raw.get("__key__", "")), str(raw.get("__url__", ""))
    try:
        ext = media_key(raw)
    except KeyError as exc:
        raise SampleError(str(exc)) from exc
    caption, info_json = _read_text_members(raw)
    height, width = info_json.get("height"), info_json.get("width")
    hint = (int(height), int(width)) if height and width else None
    media = open_media(raw[ext], ext, backend=backend, size_hint=hint, num_threads=decode_threads)
    try:
        info = media.info
        listed = info_json.get("frames")
        if info.kind == "video" and isinstance(listed, int) and info.num_frames < listed:
            raise DecodeError(f"truncated: the stream has {info.num_frames} of the {listed} frames listed")
        timestamps = media.timestamps() if spec.target_fps is not None else None
        bucket, indices, fps = plan_clip(info, spec, buckets, rng, timestamps)
        frames = media.read(indices)
    finally:
        media.close()
    clip_frames = resize_crop_uint8(frames, bucket.height, bucket.width, crop=spec.crop, rng=rng,
                                    resize=spec.resize)
    if info.kind == "image":
        count = num_clip_frames("image", spec, bucket.num_frames)
        clip_frames = clip_frames.expand(count, -1, -1, -1)
        indices = [0] * count
    meta = {
        "source": info_json.get("source", key),
        "shard": url,
        "fps": fps,
        "frame_indices": [int(i) for i in indices],
        "orig_size": [info.height, info.width],
        "num_frames": info.num_frames,
        "kind": info.kind,
        "pad": False,
    }
    return Clip(Bucket(bucket.height, bucket.width, clip_frames.shape[0]), clip_frames, caption, key, meta)


def new_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised batch tensor, in shared memory inside a DataLoader worker (sent without a copy)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)


def collate_clips(clips: Sequence[Clip], video_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Clips of one shape -> {"video": (B, 3, T, H, W), "caption", "key", "meta"}.

    ``video_dtype`` float32 gives values in [-1, 1] (the contract batch); uint8 keeps 0..255 for a
    conversion on the accelerator (see ``batch_to_float``).
    """
    if not clips:
        raise ValueError("cannot collate an empty list of clips")
    if video_dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"video_dtype must be torch.float32 or torch.uint8, got {video_dtype}")
    num, _, height, width = clips[0].frames.shape
    video = new_batch((len(clips), 3, num, height, width), video_dtype)
    for i, clip in enumerate(clips):
        if tuple(clip.frames.shape) != (num, 3, height, width):
            raise ValueError(
                f"clip {clip.key} has shape {tuple(clip.frames.shape)}, batch needs {video.shape[1:]}"
            )
        if video_dtype == torch.uint8:
            video[i].copy_(clip.frames.permute(1, 0, 2, 3))
        else:
            to_unit_range(clip.frames, out=video[i])
    return {
        "video": video,
        "caption": [c.caption for c in clips],
        "key": [c.key for c in clips],
        "meta": [c.meta for c in clips],
    }


def batch_to_float(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch whose uint8 video (0..255) becomes float32 in [-1, 1] on its device; float batches pass."""
    video = batch["video"]
    if video.dtype != torch.uint8:
        return batch
    return {**batch, "video": uint8_to_float(video)}
