"""Host-to-device copies that do not block the host."""

from __future__ import annotations

import torch


def to_device_nonblocking(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU from pinned memory, so the host does not wait for the copy
    (a copy from pageable memory synchronises)."""
    device = torch.device(device)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
