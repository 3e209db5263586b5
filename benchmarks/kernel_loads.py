"""How the LoRA and paged-attention kernels load from global memory, read from their PTX: each
kernel compiled for an H100/H200 (sm_90) with Llama-7B's specializations, its global loads
counted by width.

A kernel that loads its adapter weights two bytes at a time (`ld.global.b16`) issues 8x the
load instructions of 16-byte vectors and cannot stage them with `cp.async`; the decode LoRA
ran at a quarter of the memory bandwidth that way (BENCHMARKS.md, eleventh session). Needs no
GPU: Triton compiles to PTX on the CPU (not under TRITON_INTERPRET).

    python -m benchmarks.kernel_loads [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from typing import Any

# Constexprs of each kernel as Llama-7B's decode and prefill steps launch them (W = 4096).
_CONSTEXPRS: dict[str, dict[str, Any]] = {
    "lora._shrink_kernel": dict(
        W=4096,
        BLOCK_T=16,
        BLOCK_R=16,
        BLOCK_K=128,
        SPLIT_K=512,
        STAGES=3,
        NPROJ=3,
        TILED=True,
        IEEE=False,
    ),
    "lora._expand_kernel": dict(
        W=4096, NPROJ=3, BLOCK_T=16, BLOCK_R=16, BLOCK_N=128, TILED=True, IEEE=False
    ),
    "lora_rows._row_shrink_kernel": dict(
        W=4096, BLOCK_R=16, BLOCK_K=256, SPLIT_K=512, STAGES=3, NPROJ=3, REQUEST_MAJOR=False
    ),
    "lora_rows._row_expand_kernel": dict(
        W=4096, NPROJ=3, SPLITS=8, BLOCK_R=8, BLOCK_N=1024, STAGES=1, ACC=2, REQUEST_MAJOR=False
    ),
    # The same kernel with its other accumulators (LoraLaunch.row_expand_accumulator): the
    # tile of batches under row_small_batch, and the chunk.
    "lora_rows._row_expand_kernel tile": dict(
        W=4096, NPROJ=3, SPLITS=8, BLOCK_R=16, BLOCK_N=512, STAGES=1, ACC=0, REQUEST_MAJOR=False
    ),
    "lora_rows._row_expand_kernel chunk": dict(
        W=4096, NPROJ=3, SPLITS=8, BLOCK_R=16, BLOCK_N=1024, STAGES=1, ACC=1, REQUEST_MAJOR=False
    ),
    "paged_attention._decode_kernel": dict(
        NUM_SPLITS=1, GROUP=1, BLOCK_G=16, HEAD_DIM=128, BLOCK_N=128, DOT_PRECISION="tf32"
    ),
    "paged_attention._prefill_kernel": dict(
        GROUP=1, HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64, DOT_PRECISION="tf32"
    ),
}
# Integer arguments a launch leaves unaligned, or unspecialized: all others are multiples of 16
# at Llama-7B shapes (strides, widths, the rank and split strides) and Triton specializes them.
_UNALIGNED = {
    "meta_stride",
    "stride_slots",
    "tiles_per_req",
    "n_rblocks",
    "rank_programs",
    "num_heads",
    "qk_scale",
}
_FLOAT32 = {"part_ptr", "y_ptr", "part_out_ptr", "part_lse_ptr"}
_WEIGHTS_DTYPE = {"x_ptr", "out_ptr", "pool_ptr", "q_ptr"}
_LOAD = re.compile(
    r"(ld\.global[.\w]*)|cp\.async\.(c[ag])\.shared\.global [^,]*, [^,]*, (0x[0-9a-f]+)"
)


def _loads(ptx: str) -> dict[str, int]:
    """Global loads by instruction; a cp.async (global to shared) named with its bytes."""
    found = Counter(
        load or f"cp.async.{cache} {int(size, 16)}B" for load, cache, size in _LOAD.findall(ptx)
    )
    return dict(found)


def _signature(fn: Any, constexprs: dict[str, Any]) -> tuple[dict, dict, dict]:
    signature: dict[str, str] = {}
    values: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            values[(i,)] = constexprs[name]
            continue
        if name.endswith("_ptr"):
            signature[name] = (
                "*fp32" if name in _FLOAT32 else "*bf16" if name in _WEIGHTS_DTYPE else "*i32"
            )
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
        if name not in _UNALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, values, attrs


def global_loads(num_warps: int = 4) -> dict[str, dict[str, int]]:
    """{kernel: {load instruction: count in its PTX}} for every LoRA and attention kernel."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernel_loads compiles PTX: run it without TRITON_INTERPRET=1")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    counts = {}
    for path, constexprs in _CONSTEXPRS.items():
        module, name = path.split(" ")[0].split(".")
        fn = getattr(importlib.import_module(f"kernels.{module}"), name)
        signature, values, attrs = _signature(fn, constexprs)
        source = ASTSource(fn=fn, signature=signature, constexprs=values, attrs=attrs)
        compiled = triton.compile(source, target=target, options={"num_warps": num_warps})
        counts[path] = _loads(compiled.asm["ptx"])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_loads", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args()
    counts = global_loads()
    if args.json:
        print(json.dumps(counts))
        return
    for kernel, loads in counts.items():
        print(f"{kernel:<38} " + ", ".join(f"{k} x{v}" for k, v in sorted(loads.items())))


if __name__ == "__main__":
    main()
