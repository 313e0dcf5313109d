"""GPU fast path: attention runs the fused SDPA kernels, not the math fallback (CUDA only).

``sdpa_kernel`` restricted to one backend makes ``scaled_dot_product_attention`` raise when its inputs
are not eligible (an fp32 q/k after the fp32 QK-norm and RoPE, a layout the kernel refuses), so a full
forward+backward of the DiT under each restriction proves the kernel is really taken.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from vdm.models.dit import VideoDiT

pytestmark = pytest.mark.gpu


def _step(model: VideoDiT, text_mask: torch.Tensor | None, dtype: torch.dtype | None) -> None:
    x = torch.randn(2, 16, 3, 16, 16, device="cuda")
    t = torch.rand(2, device="cuda")
    context = torch.randn(2, 12, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is None):
        inputs = (x, t, context) if dtype is None else (x.to(dtype), t, context.to(dtype))
        out = model(*inputs, text_mask)
    out.float().square().mean().backward()


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_self_attention_takes_flash_under_bf16_autocast(attention: str) -> None:
    model = VideoDiT(in_channels=16, patch_size=(1, 2, 2), hidden_size=128, depth=2, num_heads=2,
                     context_dim=64, attention=attention).cuda()
    # cross-attention without padding is flash-eligible too: the whole forward runs on flash
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        _step(model, None, None)


def test_bf16_weights_take_flash() -> None:
    """DeepSpeed runs the module in bf16 with no autocast: q/k leave the fp32 norm and RoPE as bf16."""
    model = VideoDiT(in_channels=16, patch_size=(1, 2, 2), hidden_size=128, depth=2, num_heads=2,
                     context_dim=64).cuda().to(torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        _step(model, None, torch.bfloat16)


def test_padded_text_takes_memory_efficient_attention() -> None:
    model = VideoDiT(in_channels=16, patch_size=(1, 2, 2), hidden_size=128, depth=2, num_heads=2,
                     context_dim=64).cuda()
    mask = torch.ones(2, 12, dtype=torch.bool, device="cuda")
    mask[1, 5:] = False
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        _step(model, mask, None)
