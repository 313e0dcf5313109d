"""DeepSpeed ZeRO-2 bf16 training throughput and MFU of a ~1B-parameter video DiT on one CUDA GPU.

The model is ``VideoDiT`` (1536 wide, 24 blocks, 24 heads, cross-attention to a 4096-wide T5 context:
1.26B parameters) with per-block activation checkpointing, trained through ``deepspeed.initialize``
(ZeRO-2, bf16, AdamW) on random latents: 16 channels x 16 x 64 x 64 with 1x2x2 patches is 16,384 tokens
per sample (a 61-frame 512x512 clip through a 4x/8x VAE). The VAE and text encoder are not run: this
measures the DiT step. FLOPs per step are counted once with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions and attention, forward + backward, activation recomputation excluded), and
MFU = FLOPs per step / step time / peak bf16 dense FLOP/s of the GPU (``--peak-tflops``, or a table).

    python bench/dit_zero2_gpu.py [--steps 20] [--batch 1] [--frames 16] [--size 64] [--json out.json]

Needs a CUDA GPU and exits with a message without one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(name: str, override: float | None) -> float:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"no bf16 peak known for {name!r}: pass --peak-tflops")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from vdm.models.dit import VideoDiT

    return VideoDiT(
        in_channels=16, patch_size=(1, 2, 2), hidden_size=args.hidden, depth=args.depth, num_heads=args.heads,
        context_dim=4096, gradient_checkpointing=not args.no_checkpointing,
    )


def batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    x = torch.randn(args.batch, 16, args.frames, args.size, args.size, device=device, dtype=torch.bfloat16)
    t = torch.rand(args.batch, device=device)
    context = torch.randn(args.batch, args.context_len, 4096, device=device, dtype=torch.bfloat16)
    mask = torch.ones(args.batch, args.context_len, dtype=torch.bool, device=device)
    return x, t, context, mask


def count_step_flops(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Forward + backward FLOPs of one step, without activation recomputation (the MFU convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    checkpointing = getattr(model, "gradient_checkpointing", False)
    model.gradient_checkpointing = False
    try:
        with FlopCounterMode(display=False) as counter:
            model(*inputs).float().pow(2).mean().backward()
    finally:
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=16, help="latent frames")
    parser.add_argument("--size", type=int, default=64, help="latent height and width")
    parser.add_argument("--context-len", type=int, default=226)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/dit_zero2_gpu.py needs a CUDA GPU")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(args)
    params = sum(p.numel() for p in model.parameters())
    tokens = args.batch * args.frames * (args.size // 2) ** 2
    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 2e8, "allgather_bucket_size": 2e8},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.0}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    inputs = batch(args, device)
    flops = count_step_flops(engine.module, inputs)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine(*inputs).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = sorted(times)[len(times) // 2]
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name, args.peak_tflops) * 1e12
    result = {
        "device": name,
        "parameters": params,
        "tokens_per_sample": tokens // args.batch,
        "batch": args.batch,
        "step_time_s": step_time,
        "tokens_per_s": tokens / step_time,
        "tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / step_time / 1e12,
        "mfu": flops / step_time / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "activation_checkpointing": not args.no_checkpointing,
    }
    print(f"{'metric':<26}value")
    for key, value in result.items():
        print(f"{key:<26}{value:.4g}" if isinstance(value, float) else f"{key:<26}{value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
