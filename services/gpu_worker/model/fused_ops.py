"""The elementwise parts of a decoder layer (RMSNorm, rotary embedding, SiLU-gate), each one
kernel on CUDA through torch.compile, plain torch elsewhere.

At decode time the matrix products are few and large while the elementwise steps between
them are many and tiny; unfused, a Llama-7B step launches over a thousand kernels whose fixed
cost adds up to milliseconds even inside a CUDA graph. The math is the same as the plain
versions (normalize in float32, scale in the input dtype, rotate-half RoPE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

_enabled = True


def set_fusion(enabled: bool) -> None:
    """Turn the compiled CUDA versions on or off (benchmarks compare both)."""
    global _enabled
    _enabled = enabled


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos, sin [T, D] (the rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _on_cuda(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    compiled: Callable[..., Any] | None = None

    def call(x: torch.Tensor, *args: Any) -> torch.Tensor:
        nonlocal compiled
        if not (_enabled and x.is_cuda):
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(x, *args)

    return call


rms_norm = _on_cuda(rms_norm_ref)
rotary = _on_cuda(rotary_ref)
silu_mul = _on_cuda(silu_mul_ref)
