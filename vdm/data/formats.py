"""Media extensions and sample-key conventions shared by the shard writer and the data pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VIDEO_EXTS: tuple[str, ...] = ("mp4", "webm", "mov", "mkv", "avi")
# "jpeg" is accepted on input but stored in shards as "jpg"
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
MEDIA_KEYS: tuple[str, ...] = VIDEO_EXTS + ("jpg", "png", "webp")


def normalize_ext(ext: str) -> str:
    """Lower-case extension without a leading dot, with "jpeg" mapped to "jpg"."""
    ext = ext.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def media_key(sample: Mapping[str, Any]) -> str:
    """Return the key of a webdataset sample that holds its media (e.g. "mp4" or "jpg").

    Raises KeyError naming the sample's ``__key__`` when no media member is present.
    """
    for key in MEDIA_KEYS:
        if key in sample:
            return key
    name = sample.get("__key__", "<unknown>")
    members = sorted(k for k in sample if not k.startswith("__"))
    raise KeyError(f"sample {name!r} has no media member (expected one of {MEDIA_KEYS}, got {members})")
