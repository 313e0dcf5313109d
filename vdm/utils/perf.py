"""Peak FLOP/s of the training device, the denominator of MFU (model FLOPs utilisation).

GPUs: the vendor's dense (no sparsity) tensor-core peaks by device name and compute dtype. CPUs have no
such table; their peak is measured: a square matmul in the training dtype, timed after a warm-up, which is
what a well-tuned step could at best reach on the same cores.
"""

from __future__ import annotations

import functools
import time

import torch

#: dense peak TFLOP/s by device-name fragment (first match wins: put the specific names first)
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H20": {"bf16": 148.0, "fp16": 148.0, "tf32": 74.0, "fp32": 44.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
}


def compute_dtype(precision: str | int | None) -> str:
    """The matmul dtype of a Lightning precision setting: bf16, fp16, tf32 or fp32."""
    text = str(precision or "32")
    if text.startswith("bf16"):
        return "bf16"
    if text.startswith("16"):
        return "fp16"
    if text.startswith("64"):
        return "fp32"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"


def table_peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of a known GPU for ``dtype``; None when the name is not in PEAK_TFLOPS."""
    for fragment, peaks in PEAK_TFLOPS.items():
        if fragment in device_name:
            return peaks.get(dtype, peaks["fp32"]) * 1e12
    return None


@functools.cache
def measured_matmul_flops(
    device: str = "cpu", dtype: str = "fp32", size: int = 1024, seconds: float = 0.5
) -> float:
    """FLOP/s of ``size`` x ``size`` matmuls in ``dtype`` on ``device``, timed for about ``seconds``."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        a @ b
        runs += 1
        if runs % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2.0 * size**3 * runs / elapsed


def peak_flops(
    device: torch.device, precision: str | int | None, override_tflops: float | None = None
) -> float:
    """The MFU denominator: ``override_tflops``, else the GPU table, else a measured matmul peak."""
    if override_tflops:
        return float(override_tflops) * 1e12
    dtype = compute_dtype(precision)
    if device.type == "cuda":
        peak = table_peak_flops(torch.cuda.get_device_name(device), dtype)
        if peak is not None:
            return peak
    measured_dtype = dtype if dtype in ("bf16", "fp16") else "fp32"
    return measured_matmul_flops(str(device), measured_dtype)
