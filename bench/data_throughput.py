"""Clips/s of the full data pipeline (shards -> batches) against raw decord decoding of the same clips.

Builds (or reuses) a corpus of 256x256 H.264 videos in the shard format, runs VideoDataModule's
training loader (2 workers by default) for a few epochs after a warm-up epoch, records every clip's
key and frame indices, then decodes exactly those clips with decord in a single process (raw
decoding only: no conversion). Rounds alternate, and the ratio is the median per-round ratio, which
keeps the comparison fair on a machine whose speed drifts. The pipeline is timed with float32
batches in [-1, 1] made in the workers and with uint8 batches converted after the device transfer
(what the shipped data configs use).

    python bench/data_throughput.py [--dir DIR] [--workers 2] [--rounds 3] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import av  # before decord: decord's FFmpeg loaded first breaks some PyAV codecs
import numpy as np


def synthetic_frames(num: int, size: int, seed: int) -> np.ndarray:
    """(T, H, W, 3) uint8: textured background with a moving bright square and light noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.stack(
        [np.sin(xx / (7 + c) + seed) * 60 + np.cos(yy / (11 + c)) * 60 + 120 for c in range(3)], -1
    )
    frames = np.empty((num, size, size, 3), np.uint8)
    side = size // 5
    for t in range(num):
        img = np.roll(base, 3 * t, axis=1) + rng.normal(0, 6, base.shape)
        x0, y0 = (5 * t) % (size - side), (3 * t) % (size - side)
        img[y0 : y0 + side, x0 : x0 + side] = (230, 200, 40)
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def encode_h264(frames: np.ndarray, fps: int, gop: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = gop
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def make_corpus(root: Path, videos: int, frames: int, size: int, gop: int, per_shard: int = 12) -> Path:
    """Write train shards + manifest.json + samples.jsonl (the vdm-shards layout); reuse if present."""
    import webdataset as wds

    manifest_path = root / "manifest.json"
    options = {"videos": videos, "frames": frames, "size": size, "gop": gop}
    if manifest_path.is_file() and json.loads(manifest_path.read_text()).get("options") == options:
        return manifest_path
    root.mkdir(parents=True, exist_ok=True)
    shards, rows = [], []
    for start in range(0, videos, per_shard):
        name = f"train-{start // per_shard:06d}.tar"
        count = min(per_shard, videos - start)
        with wds.TarWriter(str(root / name), mtime=0) as sink:
            for i in range(start, start + count):
                key = f"{i:016x}"
                meta = {
                    "key": key,
                    "source": f"bench/{i}.mp4",
                    "kind": "video",
                    "frames": frames,
                    "fps": 24.0,
                    "duration": frames / 24,
                    "width": size,
                    "height": size,
                    "codec": "h264",
                    "split": "train",
                    "reencoded": True,
                    "extra": {},
                }
                sink.write(
                    {
                        "__key__": key,
                        "mp4": encode_h264(synthetic_frames(frames, size, i), 24, gop),
                        "txt": f"bench video {i}".encode(),
                        "json": json.dumps(meta).encode(),
                    }
                )
                rows.append(
                    {
                        k: meta[k]
                        for k in ("key", "split", "kind", "width", "height", "frames", "fps", "duration")
                    }
                    | {"shard": name}
                )
        shards.append(
            {
                "name": name,
                "samples": count,
                "frames": count * frames,
                "hours": 0.0,
                "bytes": (root / name).stat().st_size,
            }
        )
    split = {
        "samples": videos,
        "frames": videos * frames,
        "hours": 0.0,
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }
    (root / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = {
        "format": "vdm-shards",
        "version": 1,
        "source": "bench",
        "options": options,
        "splits": {"train": split},
        "totals": dict(split, uncaptioned=0),
        "skipped": [],
        "index": "samples.jsonl",
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest_path


def raw_clips(root: Path) -> dict[str, bytes]:
    from vdm.data.shards import expand_shards, iter_shard

    return {
        s["__key__"]: s["mp4"] for url in expand_shards(str(root / "train-*.tar")) for s in iter_shard(url)
    }


def time_raw(data: dict[str, bytes], clips: list[tuple[str, list[int]]], threads: int) -> float:
    """Seconds to decode ``clips`` (same keys, same indices) with decord get_batch in this process."""
    import decord

    start = time.perf_counter()
    for key, indices in clips:
        reader = decord.VideoReader(io.BytesIO(data[key]), ctx=decord.cpu(0), num_threads=threads)
        frames = reader.get_batch(indices).asnumpy()
        assert frames.shape[0] == len(indices) and frames.shape[-1] == 3
    return time.perf_counter() - start


def measure(root: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """Alternate timed pipeline epochs (float32 and uint8 batches) and raw decoding of the same clips."""
    from vdm.data.datamodule import VideoDataModule

    loaders = {}
    for dtype in ("float32", "uint8"):
        dm = VideoDataModule(
            train_shards=str(root / "train-*.tar"),
            manifest=str(root / "manifest.json"),
            num_frames=args.num_frames,
            frame_stride=args.stride,
            height=args.size,
            width=args.size,
            batch_size=args.batch_size,
            num_workers=args.workers,
            batches_per_epoch=args.batches,
            shuffle_buffer=16,
            resampled=False,
            persistent_workers=args.workers > 0,
            seed=0,
            video_dtype=dtype,
        )
        dm.setup("fit")
        loaders[dtype] = (dm, dm.train_dataloader())
    data = raw_clips(root)
    rates: dict[str, list[float]] = {
        "pipeline_float32": [],
        "pipeline_uint8": [],
        "raw_threads1": [],
        "raw_threads0": [],
    }
    for epoch in range(args.rounds + 1):
        for dtype, (dm, loader) in loaders.items():
            dm.set_epoch(epoch)
            clips: list[tuple[str, list[int]]] = []
            start = time.perf_counter()
            for batch in loader:
                assert batch["video"].shape[1:] == (3, args.num_frames, args.size, args.size)
                clips += [(k, m["frame_indices"]) for k, m in zip(batch["key"], batch["meta"])]
            if epoch > 0:  # epoch 0 warms up: worker start, first reads
                rates[f"pipeline_{dtype}"].append(len(clips) / (time.perf_counter() - start))
        if epoch > 0:
            for threads in (1, 0):  # the same clips as the last pipeline epoch (same seeds for both)
                rates[f"raw_threads{threads}"].append(len(clips) / time_raw(data, clips, threads))
    return rates


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=None, help="corpus directory (default: a temp dir)")
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--frames", type=int, default=48, help="frames per source video")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--gop", type=int, default=12, help="keyframe interval")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=36, help="batches per timed round (epoch)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, after one warm-up epoch")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="write the result here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vdm-bench-") as tmp:
        root = args.dir or Path(tmp)
        make_corpus(root, args.videos, args.frames, args.size, args.gop)
        rates = measure(root, args)
    median = {name: float(np.median(values)) for name, values in rates.items()}
    best_raw = [max(a, b) for a, b in zip(rates["raw_threads1"], rates["raw_threads0"])]
    ratio = {
        dtype: float(np.median([p / r for p, r in zip(rates[f"pipeline_{dtype}"], best_raw)]))
        for dtype in ("float32", "uint8")
    }
    result = {
        "config": {
            "videos": args.videos,
            "frames": args.frames,
            "size": args.size,
            "gop": args.gop,
            "num_frames": args.num_frames,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "clips_per_round": args.batches * args.batch_size,
            "rounds": args.rounds,
        },
        "clips_per_s": median,
        "rounds": rates,
        "ratio_vs_best_raw": ratio,
    }
    print(
        f"{args.videos} videos {args.size}x{args.size}x{args.frames} H.264 (gop {args.gop}); clips of "
        f"{args.num_frames} frames; {args.batches * args.batch_size} clips x {args.rounds} rounds (medians)"
    )
    print(f"{'path':<68}{'clips/s':>9}{'ratio':>8}")
    base = f"pipeline: {args.workers} workers, batch {args.batch_size}"
    rows = [
        (f"{base}, float32 [-1, 1] in workers", "pipeline_float32", ratio["float32"]),
        (f"{base}, uint8, float on device (conf default)", "pipeline_uint8", ratio["uint8"]),
        ("raw decord get_batch, 1 process, num_threads=1", "raw_threads1", None),
        ("raw decord get_batch, 1 process, num_threads=0", "raw_threads0", None),
    ]
    for label, name, value in rows:
        print(f"{label:<68}{median[name]:>9.1f}{'' if value is None else f'{value:.2f}':>8}")
    print("ratio: pipeline / faster raw decode of the same clips, median over rounds")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
