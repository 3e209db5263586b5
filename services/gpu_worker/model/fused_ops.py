"""The elementwise parts of a decoder layer (RMSNorm, rotary embedding, SiLU-gate): plain
torch, each one Triton kernel (kernels/elementwise.py), or each one kernel through
torch.compile. Which one a model uses is chosen once, when it is built (`ElementwiseOps`; the
Triton kernels on CUDA by default, see backends.ModelBackends).

At decode time the matrix products are few and large while the elementwise steps between
them are many and tiny; unfused, a Llama-7B step launches over a thousand kernels whose fixed
cost adds up to milliseconds even inside a CUDA graph. The math is the same as the plain
versions (normalize in float32, scale in the input dtype, rotate-half RoPE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


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


Op = Callable[..., torch.Tensor]


def _compiled(fn: Op) -> Op:
    """`fn` through torch.compile, compiled at its first call (every model shares it)."""
    compiled: Callable[..., Any] | None = None

    def call(*args: Any) -> torch.Tensor:
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        return compiled(*args)

    return call


_COMPILED = (_compiled(rms_norm_ref), _compiled(rotary_ref), _compiled(silu_mul_ref))


@dataclass(frozen=True)
class ElementwiseOps:
    rms_norm: Op
    rotary: Op
    silu_mul: Op

    @classmethod
    def plain(cls) -> ElementwiseOps:
        return cls(rms_norm_ref, rotary_ref, silu_mul_ref)

    @classmethod
    def compiled(cls) -> ElementwiseOps:
        return cls(*_COMPILED)

    @classmethod
    def kernels(cls) -> ElementwiseOps:
        """The Triton kernels: in an eager (mixed) step each launch costs the host a fraction
        of a compiled function's call, and a CUDA graph captures them like any kernel."""
        # Imported here: Triton reads TRITON_INTERPRET when a kernel is defined.
        from kernels.elementwise import rms_norm, rotary, silu_mul

        return cls(rms_norm, rotary, silu_mul)
