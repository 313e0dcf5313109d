"""Data-wait fraction of the real training loader when the model step takes what it would on an H100.

The model step is replaced by a sleep of the step time predicted for the target GPU at a given MFU:
``predicted_step_s = dit_flops(DiT preset, latent of the clip, text tokens, batch, training=True) /
(mfu * peak)``, by default DiT-XL (context 4096) on the latent of a 17 x 256 x 256 clip through a
4x temporal / 8x spatial VAE (5 x 32 x 32), 300 text tokens, batch 4, at 40% of the H100's dense bf16
peak (989.4 TFLOP/s). ``--step-seconds`` replaces the prediction.

The loader is ``VideoDataModule``'s training loader over a corpus of 256x256 H.264 clips built as in
``bench/data_throughput.py``, with the settings of ``conf/data/shards.yaml`` (17 frames at stride 2,
batch 4, uint8 batches, its number of workers) plus pinned memory (when a GPU is present),
persistent workers and prefetching. After ``--warmup`` steps, ``--steps`` steps each take a batch
(``next(loader)``, the timed wait), on a GPU move it there and convert it to float (as the training
module does; on the CPU that conversion would be the GPU's work and is left out), then sleep the
step time. Reported: the fraction of wall time spent waiting,
the clips/s the step needs against those delivered, and, with ``--free-steps``, the loader's
unthrottled clips/s (no sleep) for headroom. The numbers are measured as they are: a machine with
few cores may not keep up, and the table says how many workers and cores it had.

    python bench/data_wait.py [--dir DIR] [--preset dit_xl] [--workers 8] [--steps 60] [--step-seconds S]
                              [--json OUT.json]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    add_output_args,
    apply_threads,
    build_dit,
    config_option,
    cores,
    make_parser,
    print_summary,
    resolve_device,
    write_json,
)

H100_BF16_FLOPS = 989.4e12  # vdm.utils.perf.PEAK_TFLOPS["H100"]["bf16"]


def data_defaults() -> dict[str, Any]:
    """The loader settings of conf/data/shards.yaml (the shipped corpus configuration)."""
    config = config_option("data", "shards")
    keys = ("num_frames", "frame_stride", "height", "batch_size", "num_workers", "video_dtype")
    return {k: config["data"][k] for k in keys}


def predict_step_seconds(args: argparse.Namespace) -> tuple[float, int, list[int]]:
    """(seconds, FLOPs, latent (T, H, W)) of one training step of the DiT preset on the target GPU."""
    from vdm.models.flops import dit_flops

    latent = [1 + (args.num_frames - 1) // args.vae_temporal, args.size // args.vae_spatial,
              args.size // args.vae_spatial]
    model = build_dit(args.preset, args.context_dim, "meta")  # sizes only: nothing allocated
    flops = dit_flops(model, latent, args.text_len, batch=args.batch_size, training=True)
    return flops / (args.mfu * args.peak_tflops * 1e12), flops, latent


def build_loader(root: Path, args: argparse.Namespace, pin: bool, batches: int) -> Any:
    from vdm.data.datamodule import VideoDataModule

    dm = VideoDataModule(
        train_shards=str(root / "train-*.tar"),
        manifest=str(root / "manifest.json"),
        num_frames=args.num_frames,
        frame_stride=args.stride,
        height=args.size,
        width=args.size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        batches_per_epoch=batches,
        shuffle_buffer=16,
        resampled=True,
        persistent_workers=args.workers > 0,
        pin_memory=pin,
        prefetch_factor=args.prefetch if args.workers > 0 else None,
        seed=0,
        video_dtype=args.dtype,
    )
    dm.setup("fit")
    return dm


def run_loader(root: Path, args: argparse.Namespace, step_s: float, device: torch.device, pin: bool) -> dict:
    """{"waits": per-step seconds in next(loader), "wall": seconds of the throttled steps,
    "free_rate": unthrottled clips/s or None}."""
    queued = max(args.workers, 1) * args.prefetch  # batches the workers can hold ready
    free_total = args.free_steps + queued if args.free_steps else 0
    dm = build_loader(root, args, pin, args.warmup + args.steps + free_total)
    loader = iter(dm.train_dataloader())
    try:
        return _timed_steps(loader, dm, args, step_s, device, pin, queued)
    finally:  # stop the (persistent) workers now, not whenever the loader is collected
        loader.close()
        del loader
        gc.collect()


def _timed_steps(
    loader: Any, dm: Any, args: argparse.Namespace, step_s: float, device: torch.device, pin: bool,
    queued: int,
) -> dict:
    """Warm-up steps, timed steps (take a batch, sleep ``step_s``), then unthrottled steps."""

    def take() -> float:
        start = time.perf_counter()
        batch = next(loader)
        waited = time.perf_counter() - start
        assert batch["video"].shape[1:] == (3, args.num_frames, args.size, args.size)
        if device.type == "cuda":  # on the CPU the float conversion would be the GPU's work: left out
            video = batch["video"].to(device, non_blocking=pin)
            dm.on_after_batch_transfer({**batch, "video": video}, 0)
        return waited

    for _ in range(args.warmup):  # worker start-up and first reads
        take()
        time.sleep(step_s)
    waits = []
    start = time.perf_counter()
    for _ in range(args.steps):
        waits.append(take())
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the copy is part of the step's input, not of the sleep
        time.sleep(step_s)
    wall = time.perf_counter() - start
    free_rate = None
    if args.free_steps:
        for _ in range(queued):  # drain what the workers prepared during the sleeps
            take()
        free_start = time.perf_counter()
        for _ in range(args.free_steps):
            take()
        free_rate = args.free_steps * args.batch_size / (time.perf_counter() - free_start)
    return {"waits": waits, "wall": wall, "free_rate": free_rate}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    data = data_defaults()
    parser = make_parser(__doc__)
    parser.add_argument("--dir", type=Path, default=None, help="corpus directory (default: a temp dir)")
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--frames", type=int, default=48, help="frames per source video")
    parser.add_argument("--gop", type=int, default=12, help="keyframe interval")
    parser.add_argument("--num-frames", type=int, default=data["num_frames"], help="frames per clip")
    parser.add_argument("--stride", type=int, default=data["frame_stride"])
    parser.add_argument("--size", type=int, default=data["height"], help="clip height and width")
    parser.add_argument("--batch-size", type=int, default=data["batch_size"], help="per-GPU batch")
    parser.add_argument("--workers", type=int, default=data["num_workers"])
    parser.add_argument("--prefetch", type=int, default=2, help="batches prefetched per worker")
    parser.add_argument("--pin-memory", choices=["auto", "on", "off"], default="auto", help="auto: with CUDA")
    parser.add_argument("--dtype", choices=["uint8", "float32"], default=data["video_dtype"])
    parser.add_argument("--steps", type=int, default=60, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--free-steps", type=int, default=20, help="unthrottled steps after (0: skip)")
    parser.add_argument("--preset", default="dit_xl", help="DiT preset in conf/model")
    parser.add_argument("--context-dim", type=int, default=4096)
    parser.add_argument("--text-len", type=int, default=300, help="text tokens")
    parser.add_argument("--vae-temporal", type=int, default=4)
    parser.add_argument("--vae-spatial", type=int, default=8)
    parser.add_argument("--mfu", type=float, default=0.40)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_FLOPS / 1e12)
    parser.add_argument("--step-seconds", type=float, default=None, help="use this step time instead")
    add_output_args(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.free_steps < 0:
        parser.error("--steps must be >= 1, --warmup and --free-steps >= 0")
    needed = (args.num_frames - 1) * args.stride + 1
    if args.frames < needed:
        parser.error(f"--frames {args.frames}: clips need {needed} (--num-frames, --stride)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.data_throughput import make_corpus

    args = parse_args(argv)
    apply_threads(args.threads)
    device = resolve_device(args.device)
    pin = device.type == "cuda" if args.pin_memory == "auto" else args.pin_memory == "on"
    predicted, flops, latent = predict_step_seconds(args)
    step_s = predicted if args.step_seconds is None else args.step_seconds
    with tempfile.TemporaryDirectory(prefix="vdm-bench-") as tmp:
        root = args.dir or Path(tmp)
        make_corpus(root, args.videos, args.frames, args.size, args.gop)
        run = run_loader(root, args, step_s, device, pin)
    waits, wall = run["waits"], run["wall"]
    waited = sum(waits)
    result = {
        "preset": args.preset,
        "parameters": sum(p.numel() for p in build_dit(args.preset, args.context_dim, "meta").parameters()),
        "latent": latent,
        "text_len": args.text_len,
        "batch_size": args.batch_size,
        "step_flops": flops,
        "mfu": args.mfu,
        "peak_tflops": args.peak_tflops,
        "predicted_step_s": predicted,
        "step_s": step_s,
        "step_source": "predicted" if args.step_seconds is None else "--step-seconds",
        "clip": [args.num_frames, args.size, args.size],
        "frame_stride": args.stride,
        "dtype": args.dtype,
        "workers": args.workers,
        "prefetch": args.prefetch,
        "pin_memory": pin,
        "persistent_workers": args.workers > 0,
        "device": str(device),
        **cores(),
        "steps": args.steps,
        "wall_s": wall,
        "wait_s": waited,
        "wait_fraction": waited / wall,
        "wait_per_step_median_s": statistics.median(waits),
        "wait_per_step_max_s": max(waits),
        # per step, neither waiting nor the nominal step: sleep overshoot, batch checks, the device copy
        "overhead_per_step_s": (wall - waited) / args.steps - step_s,
        "clips_per_s_needed": args.batch_size / step_s,
        "clips_per_s_delivered": args.steps * args.batch_size / wall,
        "loader_clips_per_s_unthrottled": run["free_rate"],
    }
    print(
        f"data wait of the training loader, step = sleep of {step_s * 1e3:.1f} ms ({result['step_source']}: "
        f"{args.preset}, {flops / 1e12:.2f} TFLOP/step at {args.mfu:.0%} of {args.peak_tflops:.1f} TFLOP/s)"
    )
    print_summary({k: v for k, v in result.items() if k not in ("preset", "mfu", "peak_tflops")})
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
