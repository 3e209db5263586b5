"""Integer helpers for the kernels' host code: grids and block sizes.

`triton.cdiv` and `triton.next_power_of_2` are Triton constexpr functions: every call from
Python unwraps its arguments first (a few µs each), and an eager pass, such as a mixed step's
prompt chunks, makes hundreds of calls. These are plain Python with the same results."""

from __future__ import annotations


def ceil_div(a: int, b: int) -> int:
    """⌈a / b⌉ for b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()
