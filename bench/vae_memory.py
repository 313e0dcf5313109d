"""Peak activation memory of the video VAE's encode against clip length, chunked vs in one pass.

Encodes random clips of 17, 33, 65 and 129 frames (posterior mode, no gradients) with
``VideoVAE.encode(x, chunk_frames=C)`` (frame 0, then chunks of C frames through a causal cache:
exact, activation memory of one chunk) and with the whole clip at once, and reports the peak memory
above the model and the input (see ``bench/common.py``: CUDA allocator peak on a GPU, peak RSS in a
fresh process per measurement on the CPU) and the encode time. The chunked peak should not grow with
the clip (goal: at most 10% from 17 to 129 frames) while the one-pass peak grows about linearly.

C defaults to the model's ``encode_chunk_frames`` when the preset sets one, else 16 frames (4 latent
frames at 4x temporal compression). The defaults fit a small CPU: ``vae_tiny`` at 256x256 in float32
on the CPU (``vae_base`` there would take ~10 minutes per clip length), ``vae_base`` at 256x256 in
bf16 on a GPU.

    python bench/vae_memory.py [--preset vae_tiny] [--size 256] [--frames 17 33 65 129] [--chunk-frames 16]
                               [--device auto] [--json OUT.json]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    MIB,
    add_output_args,
    apply_threads,
    build_vae,
    device_name,
    make_parser,
    memory_method,
    parse_dtype,
    peak_memory,
    print_table,
    resolve_device,
    run_isolated,
    timer,
    write_json,
)

DEFAULT_CHUNK_FRAMES = 16
GOAL_GROWTH = 0.10


def measure_encode(
    preset: str, size: int, frames: int, chunk_frames: int | None, device: str, dtype: str, batch: int = 1,
    warmup: bool = True, seed: int = 0,
) -> dict[str, Any]:
    """Peak bytes and seconds of one encode of a (batch, 3, frames, size, size) clip; None: one pass.

    Run it in a fresh process on the CPU (``run_isolated``) so the RSS peak is this encode's alone.
    """
    dev = torch.device(device)
    torch.manual_seed(seed)
    vae = build_vae(preset, dev).to(parse_dtype(dtype)).requires_grad_(False)
    vae.encode_chunk_frames = None  # the call's chunk_frames alone decides
    x = torch.randn(batch, 3, frames, size, size, device=dev, dtype=parse_dtype(dtype)).clamp_(-1, 1)

    def encode(clip: torch.Tensor) -> list[int]:
        with torch.no_grad():
            return list(vae.encode(clip, chunk_frames=chunk_frames).mode().shape)

    if warmup:  # the same call first: kernels for every shape, thread pools, allocator pools
        encode(x)
    seconds: list[float] = []

    def timed_encode() -> list[int]:
        with timer(dev, seconds):
            return encode(x)

    peak, latent = peak_memory(timed_encode, dev)
    return {
        "peak_bytes": int(peak),
        "seconds": seconds[0],
        "latent": latent,
        "model_bytes": sum(p.numel() * p.element_size() for p in vae.parameters()),
        "input_bytes": x.numel() * x.element_size(),
    }


def growth(rows: list[dict[str, Any]], mode: str) -> float | None:
    """Peak at the longest clip over the peak at the shortest, minus 1 (None if either failed)."""
    peaks = [r["peak_mib"] for r in sorted(rows, key=lambda r: r["frames"]) if r["mode"] == mode]
    if len(peaks) < 2 or None in (peaks[0], peaks[-1]) or not peaks[0]:
        return None
    return peaks[-1] / peaks[0] - 1.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__)
    parser.add_argument("--preset", default=None, help="VAE preset in conf/model (default: vae_tiny on CPU, "
                        "vae_base on GPU)")
    parser.add_argument("--size", type=int, default=256, help="frame height and width")
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65, 129])
    parser.add_argument("--chunk-frames", type=int, default=None, help="default: the model's, else 16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bf16")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up encode (the same call)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per CPU measurement")
    add_output_args(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    preset = args.preset or ("vae_base" if cuda else "vae_tiny")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if cuda else "float32")
    model = build_vae(preset, "meta")
    chunk = args.chunk_frames or model.encode_chunk_frames or DEFAULT_CHUNK_FRAMES
    rows = []
    for frames in args.frames:
        for mode, chunk_frames in (("chunked", chunk), ("one pass", None)):
            kwargs = {
                "preset": preset, "size": args.size, "frames": frames, "chunk_frames": chunk_frames,
                "device": str(device), "dtype": dtype, "batch": args.batch, "warmup": not args.no_warmup,
            }
            try:
                out = measure_encode(**kwargs) if cuda else run_isolated(
                    "bench.vae_memory", "measure_encode", kwargs, args.timeout
                )
            except torch.cuda.OutOfMemoryError as error:
                out = {"error": f"out of memory: {str(error).splitlines()[0]}"}
            finally:
                if cuda:
                    torch.cuda.empty_cache()
            row = {"frames": frames, "mode": mode, "chunk_frames": chunk_frames,
                   "peak_mib": out["peak_bytes"] / MIB if "peak_bytes" in out else None,
                   "input_mib": out["input_bytes"] / MIB if "input_bytes" in out else None,
                   "model_mib": out["model_bytes"] / MIB if "model_bytes" in out else None,
                   "seconds": out.get("seconds"), "latent": out.get("latent"), "error": out.get("error")}
            rows.append(row)
            print(f"  {frames:>4} frames {mode:<9} peak {row['peak_mib'] or 0:9.1f} MiB  "
                  f"{row['seconds'] or 0:7.2f} s  {row['error'] or ''}", flush=True)
    result = {
        "preset": preset,
        "device": device_name(device),
        "memory": memory_method(device),
        "size": args.size,
        "batch": args.batch,
        "dtype": dtype,
        "chunk_frames": chunk,
        "rows": rows,
        "chunked_growth": growth(rows, "chunked"),
        "one_pass_growth": growth(rows, "one pass"),
        "goal_growth": GOAL_GROWTH,
    }
    result["goal_met"] = result["chunked_growth"] is not None and result["chunked_growth"] <= GOAL_GROWTH
    print_table(
        rows,
        [("frames", "frames", ""), ("mode", "mode", ""), ("chunk_frames", "chunk", ""),
         ("peak_mib", "peak MiB", ".1f"), ("input_mib", "input MiB", ".1f"), ("seconds", "encode s", ".2f"),
         ("error", "error", "")],
        title=f"VAE encode peak memory above model + input: {preset}, {args.size}x{args.size}, "
        f"batch {args.batch}, {dtype}, {result['device']} ({result['memory']})",
    )
    span = f"{min(args.frames)} -> {max(args.frames)} frames"
    for name in ("chunked", "one_pass"):
        value = result[f"{name}_growth"]
        print(f"{name.replace('_', ' ')} growth {span}: {'-' if value is None else f'{value:+.1%}'}")
    print(f"goal (chunked growth <= {GOAL_GROWTH:.0%}): {'met' if result['goal_met'] else 'NOT met'}")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
