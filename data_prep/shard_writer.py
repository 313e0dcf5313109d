"""WebDataset shard writer shared by make_shards and the synthetic corpus.

Writes ``OUT/{split}-{index:06d}.tar`` (bounded by samples and bytes per shard), then
``OUT/samples.jsonl`` and finally ``OUT/manifest.json``. Shards are written as hidden ``.partial``
files and renamed when complete; an existing manifest is removed first, so an interrupted run never
leaves a manifest pointing at partial or mixed shards. Tar members have a fixed mtime and owner,
so identical input gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from vdm.data.probe import MediaInfo
from vdm.utils.io import atomic_write

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val")
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "samples.jsonl"
MANIFEST_FORMAT = "vdm-shards"
MANIFEST_VERSION = 1
# member mtime 2000-01-01T00:00:00Z: fixed so reruns are byte-identical; an int (a float adds pax headers)
TAR_MTIME = 946684800
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads the archive to a multiple of this
_SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")


def sample_key(name: str) -> str:
    """Sample ``__key__``: first 16 hex chars of sha1 of the posix relative path (or synthetic name)."""
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:16]


def assign_split(name: str, val_fraction: float) -> str:
    """Deterministic train/val split from a hash of ``name``; P(val) = val_fraction."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    u = int(hashlib.sha1(f"split:{name}".encode()).hexdigest()[:8], 16) / 2**32
    return "val" if u < val_fraction else "train"


@dataclass(frozen=True)
class EncodedSample:
    """One sample ready to write: media bytes plus caption and probe info."""

    key: str
    source: str
    split: str
    media_ext: str
    media: bytes
    caption: str
    info: MediaInfo
    reencoded: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
    # further tar members by extension (e.g. "text.npy"), written as given
    extra_members: Mapping[str, bytes] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """The ``<key>.json`` member (contract fields)."""
        info = self.info
        return {
            "key": self.key, "source": self.source, "kind": info.kind, "frames": info.frames,
            "fps": info.fps, "duration": info.duration, "width": info.width, "height": info.height,
            "codec": info.codec, "split": self.split, "reencoded": self.reencoded, "extra": dict(self.extra),
            "rotation": info.rotation,
        }

    def members(self) -> dict[str, bytes]:
        """Tar members by extension, already encoded (UTF-8 caption, sorted-key JSON)."""
        meta = json.dumps(self.meta(), sort_keys=True, ensure_ascii=False).encode("utf-8")
        text = self.caption.encode("utf-8")
        return {self.media_ext: self.media, **self.extra_members, "txt": text, "json": meta}


def _member_bytes(size: int) -> int:
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def _archive_bytes(member_bytes: int) -> int:
    """Final tar size: members + two zero end blocks, padded to the record size."""
    return -(-(member_bytes + 2 * _BLOCK) // _RECORD) * _RECORD


@dataclass
class _ShardStats:
    name: str
    samples: int = 0
    frames: int = 0
    seconds: float = 0.0
    member_bytes: int = 0
    bytes: int = 0

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "frames": self.frames,
                "hours": round(self.seconds / 3600, 9), "bytes": self.bytes}


class _SplitWriter:
    """Rotating tar writer for one split."""

    def __init__(self, out_dir: Path, split: str, max_samples: int, max_bytes: int) -> None:
        self.out_dir, self.split = out_dir, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[_ShardStats] = []
        self.rows: list[dict[str, Any]] = []
        self._writer: Any = None
        self._file: Any = None

    def _tmp_path(self, name: str) -> Path:
        return self.out_dir / f".{name}.partial"

    def _open(self) -> None:
        import webdataset as wds

        name = f"{self.split}-{len(self.shards):06d}.tar"
        self.shards.append(_ShardStats(name))
        self._file = self._tmp_path(name).open("wb")
        self._writer = wds.TarWriter(self._file, mtime=TAR_MTIME, encoder=False)

    def close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        self._writer = self._file = None
        stats = self.shards[-1]
        os.replace(self._tmp_path(stats.name), self.out_dir / stats.name)
        stats.bytes = (self.out_dir / stats.name).stat().st_size

    def write(self, sample: EncodedSample) -> None:
        members = sample.members()
        size = sum(_member_bytes(len(v)) for v in members.values())
        current = self.shards[-1] if self._writer is not None else None
        if current is not None and (current.samples >= self.max_samples
                                    or _archive_bytes(current.member_bytes + size) > self.max_bytes):
            self.close_shard()
            current = None
        if current is None:
            if _archive_bytes(size) > self.max_bytes:
                log.warning("sample %s (%d bytes) alone exceeds max shard bytes", sample.source, size)
            self._open()
            current = self.shards[-1]
        self._writer.write({"__key__": sample.key, **members})
        info = sample.info
        current.samples += 1
        current.frames += info.frames
        current.seconds += info.duration
        current.member_bytes += size
        self.rows.append({"key": sample.key, "split": self.split, "shard": current.name, "kind": info.kind,
                          "width": info.width, "height": info.height, "frames": info.frames,
                          "fps": info.fps, "duration": info.duration})

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self._tmp_path(self.shards[-1].name).unlink(missing_ok=True)
            self._writer = self._file = None

    def summary(self) -> dict[str, Any]:
        return {
            "samples": sum(s.samples for s in self.shards),
            "frames": sum(s.frames for s in self.shards),
            "hours": round(sum(s.seconds for s in self.shards) / 3600, 9),
            "bytes": sum(s.bytes for s in self.shards),
            "shards": [s.record() for s in self.shards],
        }


class ShardSink:
    """Collects encoded samples into train/val shards, records skipped inputs, writes the manifest.

    Use as a context manager; ``finish()`` closes the shards and writes ``samples.jsonl`` and
    ``manifest.json`` (temp file + rename). Leaving the block without ``finish()`` (an exception)
    removes the partial shard and writes no manifest.
    """

    def __init__(self, out_dir: str | Path, *, max_samples_per_shard: int = 1000,
                 max_shard_bytes: int = 1 << 30) -> None:
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        self._splits = {s: _SplitWriter(self.out_dir, s, max_samples_per_shard, max_shard_bytes)
                        for s in SPLITS}
        self._sources: dict[str, str] = {}
        self._skipped: list[dict[str, str]] = []
        self._uncaptioned = 0
        self._finished = False

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._finished:
            for writer in self._splits.values():
                writer.abort()

    def add(self, sample: EncodedSample) -> bool:
        """Write one sample; a repeated key is recorded as skipped ("duplicate key ..."), returning False."""
        if sample.split not in self._splits:
            raise ValueError(f"unknown split {sample.split!r} for {sample.source} (expected one of {SPLITS})")
        first = self._sources.get(sample.key)
        if first is not None:
            self.skip(sample.source, f"duplicate key {sample.key} (already written from {first})")
            return False
        self._sources[sample.key] = sample.source
        self._splits[sample.split].write(sample)
        self._uncaptioned += not sample.caption
        return True

    def skip(self, path: str, reason: str) -> None:
        """Record an input that was not written, with a human-readable reason."""
        self._skipped.append({"path": path, "reason": reason})

    def finish(self, *, source: str, options: Mapping[str, Any],
               extra_fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Close all shards, write samples.jsonl then manifest.json; return the manifest."""
        for writer in self._splits.values():
            writer.close_shard()
        self._finished = True
        written = {s.name for w in self._splits.values() for s in w.shards}
        for path in self.out_dir.iterdir():
            if _SHARD_RE.match(path.name) and path.name not in written:
                log.info("removing stale shard %s", path)
                path.unlink()
        rows = [row for split in SPLITS for row in self._splits[split].rows]
        atomic_write(self.out_dir / INDEX_NAME, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        splits = {split: self._splits[split].summary() for split in SPLITS}
        totals = {key: sum(splits[s][key] for s in SPLITS) for key in ("samples", "frames", "bytes")}
        totals["hours"] = round(sum(splits[s]["hours"] for s in SPLITS), 9)
        totals["uncaptioned"] = self._uncaptioned
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": source,
            "options": dict(options), "splits": splits, "totals": totals,
            "skipped": sorted(self._skipped, key=lambda s: (s["path"], s["reason"])), "index": INDEX_NAME,
        }
        manifest.update(extra_fields or {})
        text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write(self.out_dir / MANIFEST_NAME, text)
        return manifest


def write_corpus(samples: Iterable[EncodedSample], out_dir: str | Path, *, source: str,
                 options: Mapping[str, Any], skipped: Iterable[tuple[str, str]] = (),
                 max_samples_per_shard: int = 1000, max_shard_bytes: int = 1 << 30,
                 extra_fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write in-memory samples to shards + samples.jsonl + manifest.json; returns the manifest.

    ``skipped`` holds (path, reason) pairs for inputs that were not turned into samples.
    """
    sink = ShardSink(out_dir, max_samples_per_shard=max_samples_per_shard, max_shard_bytes=max_shard_bytes)
    with sink:
        for path, reason in skipped:
            sink.skip(path, reason)
        for sample in samples:
            sink.add(sample)
        return sink.finish(source=source, options=options, extra_fields=extra_fields)


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """Load ``out_dir/manifest.json``; FileNotFoundError if absent, ValueError if not a vdm manifest."""
    manifest = json.loads((Path(out_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{out_dir}/{MANIFEST_NAME} is not a {MANIFEST_FORMAT} manifest")
    return manifest
