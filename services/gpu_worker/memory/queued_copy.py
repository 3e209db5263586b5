"""Host-to-device copies that queue like kernels.

A plain `tensor.to("cuda")` from pageable memory returns only when the copy is done, and the
copy runs after everything queued before it on the stream: with overlap scheduling that is the
step the device is running, so the host would sit idle until it ends. Through pinned memory the
copy is queued instead (torch's pinned-memory allocator keeps the host buffer alive until the
copy has run)."""

from __future__ import annotations

import torch


def queued_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor the caller no longer writes) on `device`, the copy queued on the
    current stream on CUDA; a plain copy elsewhere."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
