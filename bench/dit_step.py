"""DiT training-step FLOP/s against the matmul FLOP/s of the same machine (the CPU stand-in for MFU).

Builds a ``VideoDiT`` preset (default ``dit_b``) with random weights and times full training steps on
random latents and text: forward, loss, backward and a fused AdamW step. Model FLOPs per step come from
the analytic count (``vdm.models.flops.dit_flops(training=True)``: 3 x forward matmul FLOPs); the
reference is the FLOP/s of a square matmul in the same dtype on the same device
(``vdm.utils.perf.measured_matmul_flops``), measured between the timed steps so both see the same machine
state. On a CUDA GPU the steps run under bf16 autocast and the table peak is reported too (MFU).

    python bench/dit_step.py [--preset dit_b] [--latent 8 32 32] [--batch 2] [--text 64] [--steps 4]
        [--checkpointing off] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import load_preset  # noqa: E402


def build(
    preset: str, context_dim: int, device: torch.device, checkpointing: bool | None = None
) -> torch.nn.Module:
    from vdm.models.dit import VideoDiT

    config = load_preset(preset) | {"context_dim": context_dim}
    if checkpointing is not None:
        config["gradient_checkpointing"] = checkpointing
    return VideoDiT(**config).to(device)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from vdm.models.flops import dit_flops
    from vdm.utils.perf import measured_matmul_flops, table_peak_flops

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    checkpointing = {"preset": None, "on": True, "off": False}[args.checkpointing]
    model = build(args.preset, args.context_dim, device, checkpointing).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    t, h, w = args.latent
    x = torch.randn(args.batch, model.in_channels, t, h, w, device=device)
    target = torch.randn_like(x)
    times = torch.rand(args.batch, device=device)
    context = torch.randn(args.batch, args.text, args.context_dim, device=device)
    mask = torch.ones(args.batch, args.text, dtype=torch.bool, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step() -> None:
        with autocast:
            loss = (model(x, times, context, mask).float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync()
    durations = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        durations.append(time.perf_counter() - start)
    step_s = sorted(durations)[len(durations) // 2]  # median: robust to a noisy neighbour
    dtype = "bf16" if cuda else "fp32"
    matmul = measured_matmul_flops(str(device), dtype, size=args.matmul_size, seconds=1.0)
    flops = dit_flops(model, (t, h, w), args.text, batch=args.batch, training=True)
    achieved = flops / step_s
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads",
        "parameters": sum(p.numel() for p in model.parameters()),
        "gradient_checkpointing": bool(model.gradient_checkpointing),
        "latent": [t, h, w],
        "batch": args.batch,
        "tokens_per_sample": model.num_tokens((t, h, w)),
        "text_tokens": args.text,
        "step_flops": flops,
        "step_s": step_s,
        "achieved_tflops": achieved / 1e12,
        "matmul_tflops": matmul / 1e12,
        "fraction_of_matmul": achieved / matmul,
    }
    peak = table_peak_flops(torch.cuda.get_device_name(device), "bf16") if cuda else None
    if peak:
        result["mfu"] = achieved / peak
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--preset", default="dit_b")
    parser.add_argument("--latent", type=int, nargs=3, default=[8, 32, 32], metavar=("T", "H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text", type=int, default=64, help="text tokens (no padding)")
    parser.add_argument("--context-dim", type=int, default=768)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpointing", choices=["preset", "on", "off"], default="off",
                        help="activation recomputation is not model FLOPs: 'on' caps the ratio at ~75%%")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    result = measure(args)
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
