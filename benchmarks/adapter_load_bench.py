"""Host time of loading one adapter into the unified pool (`AdapterManager.load`): what the
engine thread spends per adapter miss or prefetch, by rank, target modules and the dtype the
host holds it in (the store's PEFT files are fp32), Llama-7B shapes. On CUDA the load is
queued: its device time is timed apart, after a synchronize. Prints a table; `--out DIR`
writes adapter_load.json.

    python3 -m benchmarks.adapter_load_bench [--device cuda] [--ranks 8,64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.synthetic_adapters import random_canonical_adapter
from services.common.base_model import DUMMY_PRESETS, LINEAR_MODULES, TARGET_MODULES
from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.memory.adapter_manager import AdapterManager
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool
from services.gpu_worker.model.model_config import ModelConfig

TARGETS = {"attention": TARGET_MODULES, "all-linear": LINEAR_MODULES}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loads(
    manager: AdapterManager, adapter_of: dict[int, CanonicalAdapter], repeats: int, background: bool
) -> tuple[float, float]:
    """Median host ms of a load, and median ms until the device has it too."""
    device = manager.device
    host, total = [], []
    for i in range(repeats + 1):  # the first compiles and allocates: left out
        adapter = adapter_of[i % len(adapter_of)]
        _sync(device)
        began = time.perf_counter()
        manager.load(adapter, background=background)
        loaded = time.perf_counter()
        _sync(device)
        done = time.perf_counter()
        manager.evict_until_free(manager.pool.num_slots)  # all go: the next load is a miss
        if i:
            host.append((loaded - began) * 1e3)
            total.append((done - began) * 1e3)
    return statistics.median(host), statistics.median(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ranks", default="8,16,64")
    parser.add_argument("--targets", default="attention,all-linear")
    parser.add_argument("--dtypes", default="bf16,fp32", help="the host copy's dtype")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    config = ModelConfig.from_hf(DUMMY_PRESETS["llama-7b"])
    width = config.num_kv_heads * config.head_dim
    pool_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for targets in args.targets.split(","):
        for rank in (int(r) for r in args.ranks.split(",")):
            per_adapter = 2 * rank * 3 * len(TARGETS[targets])  # > slots of one adapter
            slots = per_adapter * 3 + 64
            pool = UnifiedMemoryPool(config.num_layers, slots, width, pool_dtype, device)
            manager = AdapterManager(pool, max_loras=8, max_adapter_slots=per_adapter)
            for dtype_name in args.dtypes.split(","):
                adapters = {
                    i: random_canonical_adapter(
                        config.shape,
                        rank,
                        i,
                        DTYPES[dtype_name],
                        torch.device("cpu"),
                        adapter_id=f"a{i}",
                        targets=TARGETS[targets],
                    )
                    for i in range(2)
                }
                for background in (False, True):
                    host_ms, total_ms = time_loads(manager, adapters, args.repeats, background)
                    rows.append(
                        {
                            "targets": targets,
                            "rank": rank,
                            "host_dtype": dtype_name,
                            "prefetch": background,
                            "host_ms": host_ms,
                            "until_on_device_ms": total_ms,
                        }
                    )
                    print(
                        f"{targets:10s} r{rank:<3d} {dtype_name} "
                        f"{'prefetch' if background else 'load    '} host {host_ms:7.1f} ms"
                        f"   on the device after {total_ms:7.1f} ms",
                        flush=True,
                    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "adapter_load.json").write_text(
            json.dumps({"device": str(device), "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
