"""Build WebDataset shards from a folder of videos/images or a CSV/JSONL manifest.

    python -m data_prep.make_shards SRC OUT [--workers 4] [--min-frames 17] [--reencode --max-side 256]

Each input is probed (decord, PyAV fallback, Pillow for images), filtered, optionally re-encoded to
H.264 with a short keyframe interval, and written to ``OUT/{train,val}-NNNNNN.tar`` with
``OUT/samples.jsonl`` and ``OUT/manifest.json``. Every input that is not written is listed in the
manifest's "skipped" with a reason; a broken file never stops the run. Reruns are byte-identical.

In a folder, files with a media extension are inputs, ``.txt``/``.json`` files are caption sidecars,
and any other file is reported as skipped ("unsupported extension .gif"); hidden files are ignored.
See ``data_prep.sources`` for the sidecar and CSV/JSONL manifest rules.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from data_prep.shard_writer import EncodedSample, ShardSink, assign_split, sample_key
from data_prep.sources import SourceItem, discover
from vdm.data.encode import EncodeOptions, reencode_video
from vdm.data.formats import normalize_ext
from vdm.data.probe import MediaError, MediaInfo, ext_family, probe_media, sniff_family

log = logging.getLogger(__name__)

_FAMILY_DEFAULT_EXT = {"isobmff": "mp4", "matroska": "mkv", "avi": "avi"}


@dataclass(frozen=True)
class ShardOptions:
    """Filter, encode and sharding options (all recorded in the manifest)."""

    min_frames: int = 1
    min_duration: float = 0.0
    max_duration: float | None = None
    min_side: int = 0
    require_caption: bool = False
    reencode: bool = False
    max_side: int | None = None
    keyframe_interval: int = 8
    crf: int = 20
    preset: str = "medium"
    val_fraction: float = 0.05
    max_samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {self.val_fraction}")
        if self.max_side is not None and self.max_side < 2:
            raise ValueError(f"max_side must be >= 2, got {self.max_side}")
        EncodeOptions(self.keyframe_interval, self.crf, self.preset)  # validates


@dataclass(frozen=True)
class _Job:
    item: SourceItem
    key: str
    split: str
    options: ShardOptions


def filter_reason(info: MediaInfo, options: ShardOptions) -> str | None:
    """Why a probed file is rejected by the filters, or None. Images skip frame/duration filters."""
    side = min(info.width, info.height)
    if side < options.min_side:
        return f"too small: {info.width}x{info.height}, min side {side} < {options.min_side}"
    if info.kind == "image":
        return None
    if info.frames < options.min_frames:
        return f"too short: {info.frames} frames < {options.min_frames}"
    if info.duration < options.min_duration:
        return f"too short: {info.duration:.2f} s < {options.min_duration:.2f} s"
    if options.max_duration is not None and info.duration > options.max_duration:
        return f"too long: {info.duration:.2f} s > {options.max_duration:.2f} s"
    return None


def _stored_ext(ext: str, data: bytes) -> str:
    """Member extension: the file's own, unless its bytes are another container family (mislabelled)."""
    family = sniff_family(data[:16])
    if family in _FAMILY_DEFAULT_EXT and family != ext_family(ext):
        return _FAMILY_DEFAULT_EXT[family]
    return ext


def process_job(job: _Job) -> EncodedSample | tuple[str, str]:
    """Probe, filter and (optionally) re-encode one input; a (name, reason) pair when it is skipped."""
    item, opts = job.item, job.options
    try:
        if opts.require_caption and not item.caption:
            return item.name, "no caption"
        ext = normalize_ext(item.path.suffix)
        try:
            data = item.path.read_bytes()
        except FileNotFoundError:
            return item.name, "missing file"
        info = probe_media(data, ext)
        reason = filter_reason(info, opts)
        if reason is not None:
            return item.name, reason
        reencoded = opts.reencode and info.kind == "video"
        if reencoded:
            try:
                encode = EncodeOptions(opts.keyframe_interval, opts.crf, opts.preset)
                data = reencode_video(data, opts.max_side, encode)
                info = probe_media(data, "mp4")
            except Exception as err:  # noqa: BLE001 - any encoder failure only skips this file
                return item.name, f"re-encode failed: {type(err).__name__}: {err}"
            ext = "mp4"
        elif info.kind == "video":
            ext = _stored_ext(ext, data)
        return EncodedSample(job.key, item.name, job.split, ext, data, item.caption, info, reencoded,
                             item.extra)
    except MediaError as err:
        return item.name, str(err)
    except Exception as err:  # noqa: BLE001 - a broken file must never stop the run
        log.debug("unexpected error on %s", item.name, exc_info=True)
        return item.name, f"error: {type(err).__name__}: {err}"


def _plan(items: Iterable[SourceItem], options: ShardOptions) -> tuple[list[_Job], list[tuple[str, str]]]:
    """Keys and splits for every item; repeated keys (same relative path) are skipped."""
    jobs: list[_Job] = []
    skipped: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for item in items:
        key = sample_key(item.name)
        if key in seen:
            skipped.append((item.name, f"duplicate key {key} (already used by {seen[key]})"))
            continue
        seen[key] = item.name
        split = item.split or assign_split(item.name, options.val_fraction)
        jobs.append(_Job(item, key, split, options))
    return jobs, skipped


def _results(jobs: list[_Job], workers: int) -> Iterator[EncodedSample | tuple[str, str]]:
    """Results in job order; workers > 1 uses a spawn pool (the parent may hold decoder/torch threads)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(process_job, jobs)
        return
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(level,)) as pool:
        yield from pool.imap(process_job, jobs, chunksize=1)


def _init_worker(level: int) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def make_shards(src: str | Path, out: str | Path, *, workers: int = 1, progress: bool = False,
                **options: Any) -> dict[str, Any]:
    """Probe, filter, (re-encode) and shard ``src`` into ``out``; returns the manifest.

    ``options`` are :class:`ShardOptions` fields (min_frames, min_duration, max_duration, min_side,
    require_caption, reencode, max_side, keyframe_interval, crf, preset, val_fraction,
    max_samples_per_shard, max_shard_bytes).
    """
    from tqdm import tqdm

    opts = ShardOptions(**options)
    src, out = Path(src).resolve(), Path(out).resolve()
    items, skipped = discover(src, exclude=out)
    jobs, duplicates = _plan(items, opts)
    with ShardSink(out, max_samples_per_shard=opts.max_samples_per_shard,
                   max_shard_bytes=opts.max_shard_bytes) as sink:
        for name, reason in skipped + duplicates:
            sink.skip(name, reason)
        bar = tqdm(_results(jobs, workers), total=len(jobs), unit="file", disable=not progress)
        for result in bar:
            if isinstance(result, EncodedSample):
                sink.add(result)
            else:
                sink.skip(*result)
        return sink.finish(source=str(src), options=dataclasses.asdict(opts))


def _parse_bytes(text: str) -> int:
    """"512M", "2G", "1000000" -> bytes (binary multiples)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    d = ShardOptions()
    p = argparse.ArgumentParser(prog="python -m data_prep.make_shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", type=Path,
                   help="folder of media (with .txt/.json caption sidecars) or a .csv/.jsonl manifest")
    p.add_argument("out", type=Path, help="output folder for shards, samples.jsonl and manifest.json")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="hash-split fraction for val")
    p.add_argument("--min-frames", type=int, default=d.min_frames)
    p.add_argument("--min-duration", type=float, default=d.min_duration, help="seconds")
    p.add_argument("--max-duration", type=float, default=d.max_duration, help="seconds (default: no limit)")
    p.add_argument("--min-side", type=int, default=d.min_side, help="pixels; applies to images too")
    p.add_argument("--require-caption", action="store_true", help="skip inputs without a caption")
    p.add_argument("--reencode", action="store_true", help="re-encode videos to H.264 mp4 (yuv420p)")
    p.add_argument("--max-side", type=int, default=d.max_side, help="re-encode: longest side in pixels")
    p.add_argument("--keyframe-interval", type=int, default=d.keyframe_interval, help="re-encode: GOP size")
    p.add_argument("--crf", type=int, default=d.crf, help="re-encode: x264 constant rate factor")
    p.add_argument("--preset", default=d.preset, help="re-encode: x264 preset")
    p.add_argument("--max-samples-per-shard", type=int, default=d.max_samples_per_shard)
    p.add_argument("--max-shard-bytes", type=_parse_bytes, default=d.max_shard_bytes, help="e.g. 512M, 2G")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 when at least one sample was written."""
    args = vars(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.DEBUG if args.pop("verbose") else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    src, out, workers = args.pop("src"), args.pop("out"), args.pop("workers")
    progress = not args.pop("no_progress")
    start = time.perf_counter()
    manifest = make_shards(src, out, workers=workers, progress=progress, **args)
    elapsed = time.perf_counter() - start
    totals, splits = manifest["totals"], manifest["splits"]
    num_shards = sum(len(s["shards"]) for s in splits.values())
    print(f"wrote {totals['samples']} samples ({splits['train']['samples']} train, "
          f"{splits['val']['samples']} val) in {num_shards} shards, {totals['hours'] * 3600:.1f} s of video, "
          f"{totals['bytes'] / 1e6:.1f} MB to {out} in {elapsed:.1f} s")
    if manifest["skipped"]:
        reasons = Counter(s["reason"].split(":")[0] for s in manifest["skipped"])
        print(f"skipped {len(manifest['skipped'])} inputs (see manifest.json): "
              + ", ".join(f"{r} x{n}" for r, n in reasons.most_common()))
    return 0 if totals["samples"] else 1


if __name__ == "__main__":
    from data_prep.make_shards import main as _main  # the package module, so worker processes can import it

    sys.exit(_main())
