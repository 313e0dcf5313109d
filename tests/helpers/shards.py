"""Tiny vdm-shards corpora for the data pipeline tests, written with webdataset's TarWriter.

Follows the shard contract: ``{split}-{index:06d}.tar`` with ``<key>.<ext>``, ``<key>.txt`` and
``<key>.json`` members, plus ``manifest.json`` and ``samples.jsonl``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from tests.helpers.media import encode_video, moving_square_frames


@dataclass
class Item:
    """One sample to write: media bytes under ``ext`` plus its caption and stream properties."""

    name: str
    ext: str
    data: bytes
    frames: int
    height: int
    width: int
    fps: float = 8.0
    caption: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return hashlib.sha1(self.name.encode()).hexdigest()[:16]

    @property
    def kind(self) -> str:
        return "image" if self.ext in ("jpg", "png", "webp") else "video"


def video_item(
    name: str,
    frames: int = 12,
    height: int = 32,
    width: int = 32,
    ext: str = "mp4",
    fps: int = 8,
    seed: int = 0,
    gop: int | None = None,
) -> Item:
    data = encode_video(moving_square_frames(frames, height, width, seed), ext, fps=fps, gop=gop)
    return Item(name, ext, data, frames, height, width, float(fps), caption=f"caption of {name}")


def image_item(name: str, height: int = 32, width: int = 32, seed: int = 0) -> Item:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(moving_square_frames(1, height, width, seed)[0]).save(buf, format="PNG")
    return Item(name, "png", buf.getvalue(), 1, height, width, 0.0, caption=f"image {name}")


def corrupt_item(name: str, data: bytes = b"\x00" * 64, ext: str = "mp4") -> Item:
    return Item(name, ext, data, 12, 32, 32, 8.0, caption="broken")


def write_corpus(root: Path, splits: dict[str, Sequence[Sequence[Item]]]) -> Path:
    """Write ``{split: [shard items, ...]}`` under root; returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    manifest: dict[str, Any] = {
        "format": "vdm-shards",
        "version": 1,
        "source": "tests",
        "options": {},
        "splits": {},
        "skipped": [],
        "index": "samples.jsonl",
    }
    for split, shards in splits.items():
        entries = []
        for index, items in enumerate(shards):
            name = f"{split}-{index:06d}.tar"
            with wds.TarWriter(str(root / name), mtime=0) as sink:
                for item in items:
                    meta = {
                        "key": item.key,
                        "source": item.name,
                        "kind": item.kind,
                        "frames": item.frames,
                        "fps": item.fps,
                        "duration": item.frames / item.fps if item.fps else 0.0,
                        "width": item.width,
                        "height": item.height,
                        "codec": "test",
                        "split": split,
                        "reencoded": False,
                        "extra": item.extra,
                    }
                    sink.write(
                        {
                            "__key__": item.key,
                            item.ext: item.data,
                            "txt": item.caption.encode(),
                            "json": json.dumps(meta).encode(),
                        }
                    )
                    rows.append(
                        {
                            "key": item.key,
                            "split": split,
                            "shard": name,
                            "kind": item.kind,
                            "width": item.width,
                            "height": item.height,
                            "frames": item.frames,
                            "fps": item.fps,
                            "duration": meta["duration"],
                        }
                    )
            entries.append(
                {
                    "name": name,
                    "samples": len(items),
                    "frames": sum(i.frames for i in items),
                    "hours": 0.0,
                    "bytes": (root / name).stat().st_size,
                }
            )
        manifest["splits"][split] = {
            "samples": sum(e["samples"] for e in entries),
            "frames": sum(e["frames"] for e in entries),
            "hours": 0.0,
            "bytes": sum(e["bytes"] for e in entries),
            "shards": entries,
        }
    manifest["totals"] = {
        "samples": len(rows),
        "frames": sum(r["frames"] for r in rows),
        "hours": 0.0,
        "bytes": 0,
        "uncaptioned": 0,
    }
    (root / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root / "manifest.json"


def simple_corpus(
    root: Path, shard_sizes: Sequence[int], *, val_sizes: Sequence[int] = (), frames: int = 12, size: int = 32
) -> Path:
    """Videos named v0, v1, ... spread over train shards of the given sizes (and val shards)."""
    counter = iter(range(10**6))
    splits: dict[str, list[list[Item]]] = {}
    for split, sizes in (("train", shard_sizes), ("val", val_sizes)):
        if sizes:
            splits[split] = [
                [
                    video_item(f"{split}{next(counter)}", frames, size, size, seed=len(splits))
                    for _ in range(n)
                ]
                for n in sizes
            ]
    return write_corpus(root, splits)
