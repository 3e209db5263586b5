"""The host code's integer helpers give Triton's own results (`triton.cdiv`,
`triton.next_power_of_2`), which they replace for speed."""

from __future__ import annotations

import triton

from kernels.host_math import ceil_div, next_power_of_2


def test_ceil_div_is_tritons():
    for a in range(0, 600):
        for b in range(1, 70):
            assert ceil_div(a, b) == triton.cdiv(a, b), (a, b)


def test_next_power_of_2_is_tritons():
    for n in [*range(1, 5000), 2**20 - 1, 2**20, 2**20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
