"""Triton kernels for the elementwise steps of a decoder layer: RMSNorm, rotary embedding and
the SiLU gate, one launch each.

They compute what `services.gpu_worker.model.fused_ops`'s `rms_norm_ref`, `rotary_ref` and
`silu_mul_ref` compute, in float32 with one rounding to the input dtype at the end (as
torch.compile's fused kernels do; the plain-torch references round after each step, so bf16
results may differ from them in the last bit). Why kernels and not torch.compile: a mixed
step runs eagerly, and a compiled function's guards and runtime wrapper cost several times
the host time of a plain Triton launch, 160 times a step at Llama-7B depth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.host_math import ceil_div, next_power_of_2


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n, eps, BLOCK: tl.constexpr):
    """One program per row: out[t] = w * (x[t] / sqrt(mean(x[t]²) + eps))."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + t * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = x * rstd
    tl.store(out_ptr + t * stride_out + cols, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, N] (unit column stride), weight [N] -> [T, N] in x's dtype."""
    tokens, n = x.shape
    out = torch.empty((tokens, n), dtype=x.dtype, device=x.device)
    if tokens:
        block = next_power_of_2(n)
        _rms_norm_kernel[(tokens,)](
            x, weight, out, x.stride(0), out.stride(0), n, eps, BLOCK=block, num_warps=8
        )
    return out


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    heads,
    stride_xt,
    stride_xh,
    stride_ct,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program per (token, block of heads): rotate-half RoPE of x[t, h, :]."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    ok = (h < heads)[:, None]
    x_row = x_ptr + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(x_row, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * stride_ct + d).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + d).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * stride_ct + d).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * stride_ct + HALF + d).to(tl.float32)[None, :]
    dtype = out_ptr.dtype.element_ty
    out_row = out_ptr + (t * heads + h[:, None]) * (2 * HALF) + d[None, :]
    tl.store(out_row, (x1 * c1 - x2 * s1).to(dtype), mask=ok)
    tl.store(out_row + HALF, (x2 * c2 + x1 * s2).to(dtype), mask=ok)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] (unit stride over D, any token and head strides), cos and sin [T, D]
    (same strides) -> [T, heads, D], contiguous, in x's dtype."""
    tokens, heads, dim = x.shape
    if dim % 2 or cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError("rotary needs an even head dim and cos, sin of one unit-stride layout")
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens:
        block_h = min(next_power_of_2(heads), max(1, 4096 // dim))
        grid = (tokens, ceil_div(heads, block_h))
        _rotary_kernel[grid](
            x, cos, sin, out, heads, x.stride(0), x.stride(1), cos.stride(0), dim // 2, block_h
        )
    return out


@triton.jit
def _silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr, n, stride_g, stride_u, stride_out, BLOCK: tl.constexpr
):
    """Grid (T, cdiv(n, BLOCK)): out[t, j] = silu(gate[t, j]) * up[t, j]."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    g = tl.load(gate_ptr + t * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + t * stride_u + cols, mask=ok, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + t * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [T, N] (unit column stride; e.g. the halves of a fused gate/up output)
    -> silu(gate) * up [T, N], contiguous, in gate's dtype."""
    tokens, n = gate.shape
    out = torch.empty((tokens, n), dtype=gate.dtype, device=gate.device)
    if tokens:
        block = 1024
        _silu_mul_kernel[(tokens, ceil_div(n, block))](
            gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0), BLOCK=block
        )
    return out
