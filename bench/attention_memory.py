"""Memory and time of the DiT's self-attention against sequence length: fused kernels vs the S x S matrix.

For the heads and head width of DiT presets (``dit_b``: 12 x 64, ``dit_xl``: 16 x 72), runs one
forward + backward of attention over q, k, v of shape (B, heads, S, head_dim) (what ``SelfAttention``
hands to ``torch.nn.functional.scaled_dot_product_attention``) and reports the peak memory above the
inputs (see ``bench/common.py``: CUDA allocator peak on a GPU, peak RSS in a fresh process per
measurement on the CPU; the inputs' gradients are part of it) and the median time.
Implementations:

- GPU: SDPA restricted to each backend with ``torch.nn.attention.sdpa_kernel``: ``flash``,
  ``efficient`` (memory-efficient), ``math``; plus ``explicit``;
- CPU: ``sdpa`` (SDPA's default choice, a fused flash kernel for CPU) and ``explicit``:
  ``softmax(q k^T / sqrt(d)) v`` written out, which keeps S x S scores for the backward.

Fused kernels grow linearly in S, the explicit product quadratically: ``growth`` is the peak at the
longest S over the peak at the shortest and ``exponent`` the log-log slope between them (1 linear,
2 quadratic). ``scores_mib`` is the size of one S x S score tensor (B x heads x S^2) for reference.

    python bench/attention_memory.py [--presets dit_b dit_xl] [--seq 1024 2048 4096] [--impls sdpa explicit]
                                     [--device auto] [--json OUT.json]

Defaults: S up to 4096 and float32 on the CPU (the explicit product at 4096 needs ~4 GiB there), up to
16384 in bf16 on a GPU.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import (  # noqa: E402
    MIB,
    add_output_args,
    apply_threads,
    device_name,
    load_preset,
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

CPU_SEQ = [1024, 2048, 4096]
GPU_SEQ = [1024, 2048, 4096, 8192, 16384]
CPU_IMPLS = ["sdpa", "explicit"]
GPU_IMPLS = ["flash", "efficient", "math", "explicit"]


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with the (B, heads, S, S) scores materialised; (B, h, S, d) each."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # B h S S
    return scores.softmax(dim=-1) @ v  # B h S d


def attention_fn(impl: str) -> Any:
    """A function (q, k, v) -> out running attention with implementation ``impl``."""
    if impl == "explicit":
        return explicit_attention
    if impl == "sdpa":
        return F.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}[impl]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def measure_attention(
    heads: int, head_dim: int, seq: int, impl: str, device: str, dtype: str, batch: int = 1, reps: int = 1,
    warmup: bool = True, seed: int = 0,
) -> dict[str, Any]:
    """Peak bytes above q, k, v and the output gradient, and median seconds, of forward + backward.

    Run it in a fresh process on the CPU (``run_isolated``) so the RSS peak is this call's alone.
    """
    dev = torch.device(device)
    torch.manual_seed(seed)
    shape = (batch, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, device=dev, dtype=parse_dtype(dtype), requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, device=dev, dtype=parse_dtype(dtype))
    attend = attention_fn(impl)

    def step() -> None:
        attend(q, k, v).backward(grad_out)

    def clear() -> None:
        q.grad = k.grad = v.grad = None

    if warmup:  # kernels, thread pools and allocator pools set up by the same call first
        step()
        clear()
    times: list[float] = []

    def timed_step() -> None:
        with timer(dev, times):
            step()

    peak, _ = peak_memory(timed_step, dev)
    clear()
    for _ in range(reps - 1):
        timed_step()
        clear()
    return {"peak_bytes": int(peak), "seconds": statistics.median(times)}


def run_one(kwargs: dict[str, Any], cuda: bool, timeout: float) -> dict[str, Any]:
    """One measurement: in this process on a GPU (errors such as out of memory recorded), else isolated."""
    if not cuda:
        return run_isolated("bench.attention_memory", "measure_attention", kwargs, timeout)
    try:
        return measure_attention(**kwargs)
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    except RuntimeError as error:  # e.g. a backend that does not support this shape or dtype
        return {"error": str(error).strip().splitlines()[0][:160]}
    finally:
        torch.cuda.empty_cache()


def growth_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (preset, impl): peak at the longest S over the peak at the shortest, and the log-log slope."""
    out = []
    for key in dict.fromkeys((r["preset"], r["impl"]) for r in rows):
        ok = [r for r in rows if (r["preset"], r["impl"]) == key and r["peak_mib"]]
        ok.sort(key=lambda r: r["seq"])
        entry = {"preset": key[0], "impl": key[1], "seq_min": None, "seq_max": None, "growth": None,
                 "exponent": None}
        if len(ok) >= 2:
            first, last = ok[0], ok[-1]
            ratio = last["peak_mib"] / first["peak_mib"]
            entry.update(seq_min=first["seq"], seq_max=last["seq"], growth=ratio,
                         exponent=math.log(ratio) / math.log(last["seq"] / first["seq"]))
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__)
    parser.add_argument("--presets", nargs="+", default=["dit_b", "dit_xl"], help="DiT presets in conf/model")
    parser.add_argument("--seq", type=int, nargs="+", default=None, help=f"CPU {CPU_SEQ}, GPU {GPU_SEQ}")
    parser.add_argument("--impls", nargs="+", default=None,
                        help=f"sdpa flash efficient math cudnn explicit (CPU {CPU_IMPLS}, GPU {GPU_IMPLS})")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, float32 on CPU), float32, bf16")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (CPU 1, GPU 5)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per CPU measurement")
    add_output_args(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    seqs = args.seq or (GPU_SEQ if cuda else CPU_SEQ)
    impls = args.impls or (GPU_IMPLS if cuda else CPU_IMPLS)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if cuda else "float32")
    reps = args.reps or (5 if cuda else 1)
    element = torch.tensor([], dtype=parse_dtype(dtype)).element_size()
    rows = []
    for preset in args.presets:
        config = load_preset(preset)
        heads, head_dim = int(config["num_heads"]), int(config["hidden_size"]) // int(config["num_heads"])
        for impl in impls:
            for seq in seqs:
                kwargs = {
                    "heads": heads, "head_dim": head_dim, "seq": seq, "impl": impl, "device": str(device),
                    "dtype": dtype, "batch": args.batch, "reps": reps,
                }
                out = run_one(kwargs, cuda, args.timeout)
                row = {"preset": preset, "heads": heads, "head_dim": head_dim, "impl": impl, "seq": seq,
                       "peak_mib": out["peak_bytes"] / MIB if "peak_bytes" in out else None,
                       "ms": out["seconds"] * 1e3 if "seconds" in out else None,
                       "scores_mib": args.batch * heads * seq**2 * element / MIB, "error": out.get("error")}
                rows.append(row)
                print(f"  {preset} {impl:<9} S={seq:<6} peak {row['peak_mib'] or 0:9.1f} MiB "
                      f"{row['ms'] or 0:9.1f} ms  {row['error'] or ''}", flush=True)
    growth = growth_rows(rows)
    result = {
        "device": device_name(device),
        "memory": memory_method(device),
        "dtype": dtype,
        "batch": args.batch,
        "reps": reps,
        "rows": rows,
        "growth": growth,
    }
    print_table(
        rows,
        [("preset", "preset", ""), ("heads", "heads", ""), ("head_dim", "d", ""), ("impl", "impl", ""),
         ("seq", "S", ""), ("peak_mib", "peak MiB", ".1f"), ("scores_mib", "S^2 scores MiB", ".1f"),
         ("ms", "fwd+bwd ms", ".1f"), ("error", "error", "")],
        title=f"attention forward + backward, batch {args.batch}, {dtype}, {result['device']} "
        f"({result['memory']})",
    )
    print_table(
        growth,
        [("preset", "preset", ""), ("impl", "impl", ""), ("seq_min", "S from", ""), ("seq_max", "S to", ""),
         ("growth", "peak growth x", ".2f"), ("exponent", "exponent", ".2f")],
        title="growth of the peak (exponent 1: linear, 2: quadratic)",
    )
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
