"""Shard specs, per-shard sample counts, rank/worker identity and raw tar reading.

Shard specs: local paths with globs (``/data/train-*.tar``), brace ranges
(``/data/train-{000000..000003}.tar``), ``pipe:`` commands (``pipe:aws s3 cp s3://b/x.tar -``) or
other URLs webdataset's ``gopen`` opens; a list of specs is concatenated. Braces expand first, then
local globs (sorted); a local spec matching nothing is an error naming it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

logger = logging.getLogger(__name__)

_GLOB_CHARS = set("*?[")


def _is_remote(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def expand_shards(specs: str | Sequence[str]) -> list[str]:
    """Shard urls from one spec or a list of specs (globs, brace ranges, ``pipe:`` urls)."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [os.fspath(specs)]
    urls: list[str] = []
    for spec in specs:
        spec = os.fspath(spec)
        for item in braceexpand.braceexpand(spec):
            if _is_remote(item):
                urls.append(item)
                continue
            local = item[len("file:") :] if item.startswith("file:") else item
            local = os.path.expanduser(local)
            if _GLOB_CHARS & set(local):
                matches = sorted(glob.glob(local))
                if not matches:
                    raise FileNotFoundError(f"shard glob {item!r} (from spec {spec!r}) matches no files")
                urls.extend(matches)
            elif os.path.isfile(local):
                urls.append(local)
            else:
                raise FileNotFoundError(f"shard {item!r} (from spec {spec!r}) does not exist")
    if not urls:
        raise ValueError(f"shard spec {list(specs)!r} gives no shards")
    return urls


def load_manifest(path: str | Path | None) -> dict[str, Any] | None:
    """The corpus manifest.json as a dict (None when no path is given)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found; it is written by data_prep next to the shards")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "vdm-shards":
        raise ValueError(f"{path} is not a vdm-shards manifest (format={manifest.get('format')!r})")
    return manifest


def manifest_shard_counts(manifest: dict[str, Any]) -> dict[str, int]:
    """{shard file name: samples} over every split of a manifest."""
    counts: dict[str, int] = {}
    for split in manifest.get("splits", {}).values():
        for shard in split.get("shards", []):
            counts[shard["name"]] = int(shard["samples"])
    return counts


def count_tar_samples(path: str) -> int:
    """Samples (distinct keys) in a local tar shard, from its headers only."""
    keys: set[str] = set()
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if member.isreg():
                prefix, _ = base_plus_ext(member.name)
                if prefix is not None and not os.path.basename(prefix).startswith("__"):
                    keys.add(prefix)
    return len(keys)


def shard_sample_counts(urls: Sequence[str], manifest: dict[str, Any] | None = None) -> list[int] | None:
    """Samples per shard from the manifest (matched by file name) or by scanning local tars;
    None when some remote shard is not in the manifest."""
    known = manifest_shard_counts(manifest) if manifest else {}
    counts: list[int] = []
    for url in urls:
        name = os.path.basename(url.rstrip(" -").split()[-1]) if _is_remote(url) else os.path.basename(url)
        if name in known:
            counts.append(known[name])
        elif not _is_remote(url):
            counts.append(count_tar_samples(url))
        else:
            return None
    return counts


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else env RANK / WORLD_SIZE."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


SHARD_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, tarfile.TarError)


def sample_offset(path: str, index: int) -> int | None:
    """Byte offset of the first tar header of sample ``index`` in a local shard (headers only, seeking
    past member data); None when the shard has fewer samples."""
    count, previous = -1, None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            prefix, _ = base_plus_ext(member.name)
            if prefix is None or os.path.basename(prefix).startswith("__"):
                continue
            if prefix != previous:
                count, previous = count + 1, prefix
                if count == index:
                    return member.offset
    return None


def iter_shard(url: str, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard: {"__key__", "__url__", ext: bytes, ...} (webdataset's tar expansion
    and key grouping), from sample index ``skip`` on; closes the stream (and its pipe process) also when
    the consumer stops early. A local shard is entered by seeking to the sample's header; a remote one
    is read through."""
    local = None if _is_remote(url) else (url[len("file:") :] if url.startswith("file:") else url)
    if skip and local is not None:
        offset = sample_offset(local, skip)
        if offset is None:
            return
        stream = open(local, "rb")
        stream.seek(offset)
        skip = 0
    else:
        stream = wds.gopen(url, "rb")
    try:
        files = tar_file_expander([{"url": url, "stream": stream}])
        samples = group_by_keys(files)
        for _ in range(skip):
            if next(samples, None) is None:
                return
        yield from samples
    finally:
        try:
            stream.close()
        except Exception as exc:  # a pipe cut short exits non-zero; nothing left to read anyway
            logger.debug("closing %s: %s", url, exc)
