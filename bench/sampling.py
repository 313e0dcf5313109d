"""Seconds per sampled video against the number of sampling steps, with the VAE decode timed apart.

Builds a stage-2 ``DiffusionModule`` the way training does, with random weights: a DiT preset, a
VAE preset written as a stage-1 export (unit latent statistics) and the untrained stand-in T5 text
encoder of the synthetic corpus (width ``--text-dim``; the text width only changes the cross-attention
key/value projections of ~``--text-len`` tokens). Then times ``DiffusionModule.sample`` (the path
of the sample callbacks and ``evaluate.py``): the rectified-flow sampler (Euler or Heun) with
classifier-free guidance as one batched call per step, then the VAE decode, which is timed on its
own (``vae.decode`` wrapped). Each step count is timed after one short warm-up sample.

Defaults: ``dit_tiny`` + ``vae_tiny`` at 17 x 128 x 128 in float32 on the CPU; ``dit_xl`` +
``vae_base`` at 17 x 256 x 256 under bf16 autocast on a GPU.

    python bench/sampling.py [--preset dit_tiny] [--vae vae_tiny] [--frames 17] [--size 128]
                             [--steps 10 25 50] [--guidance 5.0] [--videos 1] [--device auto]
                             [--json OUT.json]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    add_output_args,
    apply_threads,
    build_dit,
    build_vae,
    device_name,
    load_preset,
    make_parser,
    print_table,
    resolve_device,
    timer,
    write_json,
)

PROMPTS = ["a red ball moving left on grass", "a blue cube moving right", "a green ball bouncing"]


def build_module(args: argparse.Namespace, tmp: Path, device: torch.device) -> Any:
    """A DiffusionModule with random weights (DiT preset, exported VAE preset, stand-in T5) on ``device``."""
    from data_prep.standin_text_encoder import ensure_random_text_encoder, synthetic_vocabulary
    from vdm.diffusion.objectives import RectifiedFlow
    from vdm.lightning.diffusion_module import DiffusionModule
    from vdm.models.text_encoder import TextEncoder
    from vdm.utils.vae_export import LatentStats, export_vae

    torch.manual_seed(0)
    vae = build_vae(args.vae)
    channels = vae.latent_channels
    stats = LatentStats(mean=[0.0] * channels, std=[1.0] * channels, num_clips=0)
    export = tmp / "vae_export"
    export_vae(vae, {"_target_": "vdm.models.vae.VideoVAE", **load_preset(args.vae)}, stats, export)
    words = synthetic_vocabulary() + [w for p in PROMPTS for w in p.split()]
    text_dir = ensure_random_text_encoder(tmp / "t5", kind="t5", vocab=words, hidden_size=args.text_dim,
                                          max_length=args.text_len)
    text = TextEncoder(str(text_dir), "t5", max_length=args.text_len)
    dit = build_dit(args.preset, args.text_dim)
    module = DiffusionModule(
        dit, str(export), text, lambda params: torch.optim.AdamW(params), RectifiedFlow(sampler=args.sampler)
    )
    return module.eval().to(device)


def time_sampling(module: Any, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Per step count: median total and decode seconds of one ``sample`` call over ``--repeats``."""
    decode_times: list[float] = []
    original = module.vae.decode

    def timed_decode(*a: Any, **kw: Any) -> torch.Tensor:
        with timer(device, decode_times):
            return original(*a, **kw)

    module.vae.decode = timed_decode  # an instance attribute shadows the method
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.videos)]
    autocast = contextlib.nullcontext()
    if args.autocast:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def sample(steps: int) -> torch.Tensor:
        with autocast:
            return module.sample(prompts, args.frames, args.size, args.size, num_steps=steps,
                                 guidance_scale=args.guidance, seed=0)

    sample(2)  # warm-up: kernels, allocator, text encoder
    rows = []
    for steps in args.steps:
        totals, decodes = [], []
        for _ in range(args.repeats):
            decode_times.clear()
            with timer(device, totals):
                video = sample(steps)
            decodes.append(sum(decode_times))
        assert video.shape == (args.videos, 3, args.frames, args.size, args.size)
        total, decode = statistics.median(totals), statistics.median(decodes)
        rows.append({
            "steps": steps,
            "total_s": total,
            "decode_s": decode,
            "denoise_s": total - decode,
            "s_per_video": total / args.videos,
            "decode_s_per_video": decode / args.videos,
            "denoise_s_per_step": (total - decode) / steps,
        })
        print(f"  {steps:>3} steps: {total:.3f} s (decode {decode:.3f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__)
    parser.add_argument("--preset", default=None, help="DiT preset (default: dit_tiny on CPU, dit_xl on GPU)")
    parser.add_argument("--vae", default=None, help="VAE preset (default: vae_tiny on CPU, vae_base on GPU)")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=None, help="height and width (default: CPU 128, GPU 256)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    parser.add_argument("--videos", type=int, default=1, help="prompts sampled together in one call")
    parser.add_argument("--text-len", type=int, default=32, help="text tokens (max_length)")
    parser.add_argument("--text-dim", type=int, default=64, help="width of the stand-in text encoder")
    parser.add_argument("--repeats", type=int, default=3, help="timed samples per step count (median)")
    parser.add_argument("--autocast", choices=["auto", "on", "off"], default="auto", help="bf16 (auto: GPU)")
    add_output_args(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.preset = args.preset or ("dit_xl" if cuda else "dit_tiny")
    args.vae = args.vae or ("vae_base" if cuda else "vae_tiny")
    args.size = args.size or (256 if cuda else 128)
    args.autocast = cuda if args.autocast == "auto" else args.autocast == "on"
    with tempfile.TemporaryDirectory(prefix="vdm-bench-") as tmp:
        module = build_module(args, Path(tmp), device)
        latent = list(module.vae.latent_shape((3, args.frames, args.size, args.size))[1:])
        rows = time_sampling(module, args, device)
    result = {
        "preset": args.preset,
        "vae": args.vae,
        "device": device_name(device),
        "dit_parameters": sum(p.numel() for p in module.dit.parameters()),
        "clip": [args.frames, args.size, args.size],
        "latent": latent,
        "tokens": module.num_tokens(latent),
        "videos_per_call": args.videos,
        "guidance": args.guidance,
        "sampler": args.sampler,
        "autocast_bf16": args.autocast,
        "rows": rows,
    }
    print_table(
        rows,
        [("steps", "steps", ""), ("s_per_video", "s/video", ".3f"),
         ("decode_s_per_video", "decode s/video", ".3f"), ("denoise_s", "denoise s", ".3f"),
         ("denoise_s_per_step", "denoise s/step", ".4f")],
        title=f"sampling {args.preset} + {args.vae}, {args.frames}x{args.size}x{args.size} (latent {latent}, "
        f"{result['tokens']} tokens), {args.sampler} + CFG {args.guidance}, {args.videos} video(s)/call, "
        f"{result['device']}",
    )
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
