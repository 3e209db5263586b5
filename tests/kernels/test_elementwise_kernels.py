"""The elementwise Triton kernels (RMSNorm, rotary, SiLU gate) against float64 references
written here, independently of the model's own plain-torch versions.

On the CPU they run under TRITON_INTERPRET=1 (conftest sets it) in float32; on the device in
bf16 at Llama-7B widths (marked `gpu`). Inputs are strided views like the model's (a column
slice of a wider output), so a kernel that assumes contiguity reads the wrong numbers.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import kernels.elementwise as ew

if not torch.cuda.is_available() and not isinstance(ew._rms_norm_kernel, InterpretedFunction):
    ew = importlib.reload(ew)  # imported earlier in this session without the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rms_norm64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return w.double() * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps)


def _rotary64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: each pair (i, i + D/2) turned by the angle whose cos and sin are
    given (both halves of a row of cos/sin hold the same angles)."""
    half = x.shape[-1] // 2
    c, s = cos.double()[:, None, :half], sin.double()[:, None, :half]
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * freqs[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _wide(
    tokens: int, width: int, offset: int, extra: int, dtype: torch.dtype, seed: int, scale: float
) -> torch.Tensor:
    """A [tokens, width] column slice of a wider tensor (row stride width + extra)."""
    gen = torch.Generator().manual_seed(seed)
    full = (torch.randn(tokens, width + extra, generator=gen) * scale).to(dtype).to(DEVICE)
    view = full[:, offset : offset + width]
    assert view.stride(0) == width + extra
    return view


CASES = [pytest.param(torch.float32, 5, 48, 16, id="cpu-fp32")]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _cases():
    if DEVICE == "cuda":
        return [
            pytest.param(torch.bfloat16, 37, 4096, 128, id="llama7b-bf16", marks=pytest.mark.gpu)
        ]
    return CASES


@pytest.mark.parametrize(("dtype", "tokens", "hidden", "head_dim"), _cases())
def test_rms_norm_matches_float64(dtype: torch.dtype, tokens: int, hidden: int, head_dim: int):
    x = _wide(tokens, hidden, 8, 24, dtype, 1, 3.0)
    w = (torch.rand(hidden, generator=torch.Generator().manual_seed(2)) + 0.5).to(dtype)
    got = ew.rms_norm(x, w.to(DEVICE), 1e-5)
    want = _rms_norm64(x.cpu(), w, 1e-5)
    assert got.shape == (tokens, hidden) and got.dtype == dtype
    torch.testing.assert_close(got.cpu().double(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize(("dtype", "tokens", "hidden", "head_dim"), _cases())
def test_rotary_matches_float64(dtype: torch.dtype, tokens: int, hidden: int, head_dim: int):
    heads = hidden // head_dim
    # q as the model makes it: a column slice of a fused q/k/v output, viewed per head.
    x = _wide(tokens, hidden, 16, 3 * 16, dtype, 3, 1.0).view(tokens, heads, head_dim)
    positions = torch.tensor([0, 1, 7, 300, 4095][:tokens] + list(range(10, 10 + tokens - 5)))
    cos, sin = _cos_sin(positions, head_dim, 10000.0, dtype)
    got = ew.rotary(x, cos.to(DEVICE), sin.to(DEVICE))
    want = _rotary64(x.cpu(), cos, sin)
    assert got.shape == (tokens, heads, head_dim)
    torch.testing.assert_close(got.cpu().double(), want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize(("dtype", "tokens", "hidden", "head_dim"), _cases())
def test_silu_mul_matches_float64(dtype: torch.dtype, tokens: int, hidden: int, head_dim: int):
    n = hidden * 2 + 96  # not a multiple of the kernel's block, as 11008 is not
    gate = _wide(tokens, n, 0, n, dtype, 4, 4.0)  # a half of a fused gate/up output
    up = _wide(tokens, n, 16, 48, dtype, 5, 4.0)  # and a tensor of another row stride
    got = ew.silu_mul(gate, up)
    g, u = gate.cpu().double(), up.cpu().double()
    want = g / (1 + torch.exp(-g)) * u
    torch.testing.assert_close(got.cpu().double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_rms_norm_of_a_zero_row_is_zero_not_nan():
    x = torch.zeros(2, 64, device=DEVICE)
    got = ew.rms_norm(x, torch.ones(64, device=DEVICE), 1e-6)
    assert torch.equal(got.cpu(), torch.zeros(2, 64))


def test_rotary_refuses_an_odd_head_dim():
    x = torch.zeros(1, 2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="even head dim"):
        ew.rotary(x, torch.zeros(1, 5, device=DEVICE), torch.zeros(1, 5, device=DEVICE))


def test_empty_batches_launch_nothing():
    empty = torch.zeros(0, 64, device=DEVICE)
    assert ew.rms_norm(empty, torch.ones(64, device=DEVICE), 1e-6).shape == (0, 64)
    assert ew.silu_mul(empty, empty).shape == (0, 64)
    assert math.prod(ew.rotary(empty.view(0, 4, 16), empty[:, :16], empty[:, :16]).shape) == 0
