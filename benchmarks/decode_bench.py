"""Issue #6's benchmark in one command: ceilings, LoRA kernels, engine decode vs HF and PEFT.

Llama-7B shapes with dummy bf16 weights (S-LoRA's setting), on the device:
1. the two ceilings (HBM copy bandwidth, bf16 matmul rate) and the decode floor
   (weight bytes / copy bandwidth);
2. the LoRA kernel table (benchmarks.lora_kernel_bench) and decode attention
   (benchmarks.attention_bench);
3. engine decode step time and tokens/s at batch 1/8/32/64/128, base only and with every
   request on its own adapter of rank 8/16/32/64, CUDA graphs on;
4. baselines in the same run: HF transformers (base) and HF PEFT with mixed adapters
   (`adapter_names`), one decode step with a KV cache.

    python -m benchmarks.decode_bench [--out DIR] [--quick]

`--targets-table` runs only a comparison of what adapters target: the engine's decode step at
batch 32 and 128 with every request on its own adapter of rank 8/16/32/64 on the attention
projections (q/k/v/o), on all seven linear layers (and gate/up/down), and base only.

    python -m benchmarks.decode_bench --targets-table [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.synthetic_adapters import TARGET_SETS, AdapterBank, random_canonical_adapter
from services.common.base_model import DUMMY_PRESETS
from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.engine.setup import build_engine
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model

RANKS = (8, 16, 32, 64)
PROMPT_LEN = 128
DEVICE = torch.device("cuda")


def _copy_bandwidth() -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    import triton.testing

    n = 1 << 30  # 2 GiB of bf16 each way
    src = torch.randn(n, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * n * 2 / (ms * 1e-3)


def _matmul_rate() -> float:
    import triton.testing

    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEVICE)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def ceilings() -> dict[str, float]:
    return {"copy_bytes_per_s": _copy_bandwidth(), "bf16_flops": _matmul_rate()}


def random_adapter(config: ModelConfig, rank: int, seed: int) -> CanonicalAdapter:
    """Drawn on the GPU (fast at 7B shapes), kept on the host as the worker's cache keeps it."""
    adapter = random_canonical_adapter(
        config.shape, rank, seed, torch.bfloat16, DEVICE, f"bench-{seed}", "llama-7b"
    )
    return adapter.to("cpu", torch.bfloat16)


def time_decode(
    engine: Engine, batch: int, adapters: list[CanonicalAdapter | None], steps: int
) -> float:
    """Median seconds per decode step with `batch` running requests (graphs on): the time
    between consecutive returns of `Engine.step`, the device synced only before and after the
    run (with overlap scheduling a step returns while its pass runs, and a sync after each
    would undo the overlap)."""
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(3, 259, (PROMPT_LEN,), generator=gen).tolist()
        opts = SamplingOptions(max_new_tokens=steps + 8, ignore_eos=True)
        engine.add(Sequence(f"b{i}", prompt, opts, ByteTokenizer(), lambda _: None, adapters[i]))
    while engine.scheduler.waiting or any(s.prefilling for s in engine.scheduler.running):
        engine.step()  # prefill everyone first
    _sync(engine.device)
    marks = [time.perf_counter()]
    for _ in range(steps):
        engine.step()
        marks.append(time.perf_counter())
    engine.flush()
    _sync(engine.device)
    for seq in list(engine.scheduler.running):
        engine.abort(seq.seq_id)
    times = sorted(b - a for a, b in itertools.pairwise(marks))
    return times[len(times) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def targets_table(
    preset: str, device: torch.device, batches: tuple[int, ...], steps: int, distinct: int = 8
) -> list[dict[str, Any]]:
    """Median decode step (s) per batch size: base only, and every request on its own adapter
    (ranks cycling through RANKS) targeting the attention projections or all linear layers.
    Adapters of one rank and target set share `distinct` weight sets (AdapterBank); each is
    still its own adapter, loaded into its own slots."""
    config = ModelConfig.from_hf(DUMMY_PRESETS[preset])
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = build_dummy_model(config, 0, dtype, device, draw_on_device=on_gpu)
    engine = build_engine(
        model,
        EngineConfig(
            pool_slots=0 if on_gpu else 64 * 1024,
            gpu_memory_fraction=0.6,
            max_num_seqs=max(batches),
            max_prefill_tokens=8192,
            max_rank=max(RANKS),
        ),
    )

    def rank_of(index: int) -> int:
        return RANKS[index % len(RANKS)]

    banks = {
        name: AdapterBank(config.shape, rank_of, dtype, device, distinct, targets=TARGET_SETS[name])
        for name in ("attention", "all-linear")
    }
    rows = []
    for batch in batches:
        row: dict[str, Any] = {"batch": batch}
        row["base_step_s"] = time_decode(engine, batch, [None] * batch, steps)
        for name, bank in banks.items():
            adapters: list[CanonicalAdapter | None] = [
                bank.adapter(i, f"{name}-{i}") for i in range(batch)
            ]
            row[f"{name}_step_s"] = time_decode(engine, batch, adapters, steps)
        rows.append(row)
        print(
            f"engine batch {batch}: "
            + ", ".join(
                f"{k[:-7]} {v * 1e3:.2f} ms" for k, v in row.items() if k.endswith("_step_s")
            ),
            flush=True,
        )
    del engine, model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return rows


def print_targets_table(rows: list[dict[str, Any]]) -> None:
    print(f"decode step (ms), every request on its own adapter of rank {RANKS[0]}-{RANKS[-1]}:")
    print("  batch    base  attention  all-linear  all/attention  all/base")
    for r in rows:
        base, attn, every = r["base_step_s"], r["attention_step_s"], r["all-linear_step_s"]
        print(
            f"  {r['batch']:>5} {base * 1e3:7.2f} {attn * 1e3:10.2f} {every * 1e3:11.2f}"
            f" {every / attn:14.2f} {every / base:9.2f}"
        )


def engine_table(batches: tuple[int, ...], steps: int) -> tuple[list[dict[str, Any]], int]:
    config = ModelConfig.from_hf(DUMMY_PRESETS["llama-7b"])
    model = build_dummy_model(config, 0, torch.bfloat16, DEVICE, draw_on_device=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = build_engine(
        model,
        EngineConfig(gpu_memory_fraction=0.6, max_num_seqs=max(batches), max_prefill_tokens=8192),
    )
    adapters: list[CanonicalAdapter | None] = [
        random_adapter(config, RANKS[i % len(RANKS)], i) for i in range(max(batches))
    ]
    rows = []
    for batch in batches:
        base = time_decode(engine, batch, [None] * batch, steps)
        mixed = time_decode(engine, batch, adapters[:batch], steps)
        rows.append(
            {
                "batch": batch,
                "base_step_s": base,
                "mixed_step_s": mixed,
                "base_tok_s": batch / base,
                "mixed_tok_s": batch / mixed,
            }
        )
        print(
            f"engine batch {batch}: base {base * 1e3:.2f} ms, mixed {mixed * 1e3:.2f} ms",
            flush=True,
        )
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
    return rows, weight_bytes


def hf_table(
    batches: tuple[int, ...], peft_batches: tuple[int, ...], steps: int
) -> list[dict[str, Any]]:
    from peft import LoraConfig, get_peft_model
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.set_default_dtype(torch.bfloat16)  # build the 7B model in bf16 directly on the GPU
    with torch.device(DEVICE):
        hf: Any = LlamaForCausalLM(LlamaConfig(**DUMMY_PRESETS["llama-7b"])).eval()
    torch.set_default_dtype(torch.float32)
    rows = []

    def step_time(model: Any, batch: int, **kwargs: Any) -> float:
        ids = torch.randint(3, 259, (batch, PROMPT_LEN), device=DEVICE)
        cache = DynamicCache()
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for _ in range(steps):
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True, **kwargs)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    for batch in batches:
        rows.append({"batch": batch, "hf_base_step_s": step_time(hf, batch)})
        print(f"HF base batch {batch}: {rows[-1]['hf_base_step_s'] * 1e3:.2f} ms", flush=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    names = [f"a{i}" for i in range(max(peft_batches))]
    peft_model = None
    for i, name in enumerate(names):
        cfg = LoraConfig(
            r=RANKS[i % 4],
            lora_alpha=2 * RANKS[i % 4],
            target_modules=targets,
            init_lora_weights=False,
        )
        if peft_model is None:
            peft_model = get_peft_model(hf, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    assert peft_model is not None
    peft_model.to(DEVICE, torch.bfloat16).eval()
    for batch in peft_batches:
        t = step_time(peft_model, batch, adapter_names=names[:batch])
        next(r for r in rows if r["batch"] == batch)["peft_mixed_step_s"] = t
        print(f"HF PEFT mixed batch {batch}: {t * 1e3:.2f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=".", help="folder for decode_bench.json")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and steps")
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip HF/PEFT and the attention table"
    )
    parser.add_argument(
        "--targets-table",
        action="store_true",
        help="only the decode step with attention-only vs all-linear adapters (batch 32, 128)",
    )
    args = parser.parse_args()
    if args.targets_table:
        rows = targets_table("llama-7b", DEVICE, (32, 128), 10 if args.quick else 30)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "decode_targets.json").write_text(json.dumps(rows, indent=2))
        print_targets_table(rows)
        return
    batches = (1, 8, 32) if args.quick else (1, 8, 32, 64, 128)
    steps = 10 if args.quick else 30
    from benchmarks import attention_bench, lora_kernel_bench

    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "date": time.strftime("%F")}
    result["ceilings"] = ceilings()
    print("ceilings", result["ceilings"], flush=True)
    result["lora_kernels"] = lora_kernel_bench.run(DEVICE)
    if not args.no_baselines:
        result["attention"] = attention_bench.run(
            DEVICE, batches=(1, 8, 32, 128), contexts=(512, 2048)
        )
    result["engine"], weight_bytes = engine_table(batches, steps)
    result["floor_s"] = weight_bytes / result["ceilings"]["copy_bytes_per_s"]
    result["hf"] = [] if args.no_baselines else hf_table(batches, (1, 8, 32), max(3, steps // 3))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_bench.json").write_text(json.dumps(result, indent=2))
    print_summary(result)


def print_summary(r: dict[str, Any]) -> None:
    c = r["ceilings"]
    print(
        f"\n{r['device']}  copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s  "
        f"bf16 {c['bf16_flops'] / 1e12:.0f} TFLOP/s  "
        f"floor {r['floor_s'] * 1e3:.2f} ms"
    )
    print("LoRA qkv op (us): batch ours GB/s bmm_padded bmm_gather gather_ref")
    for k in r["lora_kernels"]:
        print(
            f"  {k['batch']:>4} {k['ours_us']:7.1f} {k['ours_gbps']:6.0f}"
            f" {k['bmm_padded_us']:8.1f} {k['bmm_gather_us']:9.1f}"
            f" {k['gather_ref_us']:9.1f}"
        )
    hf = {h["batch"]: h for h in r["hf"]}
    print(
        "decode step (ms): batch base mixed mixed/base base/floor | HF base | PEFT mixed | x PEFT"
    )
    for e in r["engine"]:
        h = hf.get(e["batch"], {})
        peft = h.get("peft_mixed_step_s")
        speedup = f"{(e['batch'] / e['mixed_step_s']) / (e['batch'] / peft):.1f}" if peft else "-"
        print(
            f"  {e['batch']:>4} {e['base_step_s'] * 1e3:6.2f} {e['mixed_step_s'] * 1e3:6.2f}"
            f" {e['mixed_step_s'] / e['base_step_s']:5.2f} {e['base_step_s'] / r['floor_s']:5.2f}"
            f" | {h.get('hf_base_step_s', float('nan')) * 1e3:7.2f}"
            f" | {(peft or float('nan')) * 1e3:8.2f} | {speedup}"
        )


if __name__ == "__main__":
    main()
