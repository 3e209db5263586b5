"""Where an engine step's time goes, at Llama-7B shapes (dummy bf16): wall time per step and
GPU time per kernel family, for decode steps and for mixed steps (prompts joining a running
decode batch), base only and with every request on its own adapter.

    python -m benchmarks.profile_step [--out DIR] [--quick]

Each case is timed over several consecutive steps (the median time between two steps'
returns, the device synced before and after the run only: with overlap scheduling a step
returns while its pass still runs, and a sync after each would undo the overlap), then
profiled over three more with the torch profiler; kernels are grouped by name into families
(GEMM, LoRA shrink/expand, attention, sampling, other). `host` is what the median wall time
has beyond the GPU's busy time: Python, launches, and the device's idle time between steps.

Each case runs with each of `--outputs` (default both): `async` builds a step's outputs
(detokenization, stop strings, callbacks) while the next step runs on the device, `sync`
builds them before the next step starts (`EngineConfig.async_output` on and off). A case with
prompts also runs with each of `--prefill-graphs` (default both): its prompt chunks replayed
from a prefill graph (`on`) or run eagerly (`off`), side by side in one engine. And each runs
with each of `--overlap` (default both): the next step launched before this step's tokens are
read back (`on`, `EngineConfig.overlap_schedule`) or after (`off`), in the same engine.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import pstats
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.synthetic_adapters import TARGET_SETS, AdapterBank
from kernels.compile_watch import compile_watch
from kernels.lora_launch import LoraLaunch
from services.common.base_model import DUMMY_PRESETS
from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine, StepResult
from services.gpu_worker.engine.prefill_graphs import PrefillGraphs
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.engine.setup import build_engine
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.attention import TritonPagedAttention
from services.gpu_worker.model.backends import ModelBackends
from services.gpu_worker.model.fused_ops import ElementwiseOps
from services.gpu_worker.model.lora_backend import TritonLoraBackend
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model

DEVICE = torch.device("cuda")
CONTEXT = 128  # prompt tokens of the running requests
# Enough for every timed step; small enough that 192 requests and their adapters all fit the
# pool at once (else some would wait, and the timed steps would run fewer).
NEW_TOKENS = 200

# Kernel-name fragments of each family, matched in this order.
FAMILIES = (
    ("lora_shrink", ("_shrink_kernel", "shrink")),
    ("lora_expand", ("_expand_kernel", "expand")),
    ("attention", ("_decode_kernel", "_decode_reduce", "_prefill_kernel", "attention")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "cublas")),
    ("sampling", ("argmax", "softmax", "topk", "sort", "multinomial", "cumsum", "searchsorted")),
)


def family(name: str) -> str:
    lowered = name.lower()
    for fam, fragments in FAMILIES:
        if any(f in lowered for f in fragments):
            return fam
    return "other"


def add_requests(
    engine: Engine, count: int, prompt_len: int, adapters: list[CanonicalAdapter | None], tag: str
) -> list[Sequence]:
    gen = torch.Generator().manual_seed(count * 1000 + prompt_len)
    seqs = []
    for i in range(count):
        prompt = torch.randint(3, 259, (prompt_len,), generator=gen).tolist()
        opts = SamplingOptions(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        seq = Sequence(f"{tag}{i}", prompt, opts, ByteTokenizer(), lambda _: None, adapters[i])
        engine.add(seq)
        seqs.append(seq)
    return seqs


def settle(engine: Engine) -> None:
    """Step until every running request has its whole prompt in the cache."""
    while engine.scheduler.waiting or any(
        s.num_cached < len(s.prompt_ids) for s in engine.scheduler.running
    ):
        engine.step()


def timed(
    step: Callable[[], object], reps: int, host_profile: bool
) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """Median wall ms between consecutive returns of `step`, then GPU ms per kernel family
    and of the top kernels (mean over three profiled steps); with `host_profile`, cProfile's
    top functions are printed."""
    torch.cuda.synchronize()
    marks = [time.perf_counter()]
    for _ in range(reps):
        step()
        marks.append(time.perf_counter())
    torch.cuda.synchronize()
    walls = [(end - start) * 1e3 for start, end in itertools.pairwise(marks)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    gpu: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
        if event.device_type == torch.autograd.DeviceType.CUDA:
            gpu[family(event.key)] += us / 1e3 / 3
            kernels.append((event.key[:70], us / 1e3 / 3))
    if host_profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    top = sorted(kernels, key=lambda k: -k[1])[:12]
    return sorted(walls)[len(walls) // 2], dict(gpu), top


def run_case(
    engine: Engine,
    name: str,
    decode: int,
    prompts: int,
    prompt_len: int,
    adapters: Any,
    reps: int,
    host_profile: bool = False,
    context: int = CONTEXT,
    async_output: bool = True,
    prefill_graphs: PrefillGraphs | None = None,
    overlap: bool = False,
) -> dict[str, Any]:
    engine.async_output = async_output
    engine.overlap_schedule = overlap
    engine.prefill_graphs = prefill_graphs
    running = add_requests(engine, decode, context, adapters(0, decode), "d")
    settle(engine)
    compiled = compile_watch().total
    results: list[StepResult | None] = []
    if prompts == 0:
        wall, gpu, top = timed(lambda: results.append(engine.step()), reps, host_profile)
    else:
        joining: list[Sequence] = []

        def mixed_step() -> None:
            # Aborting last step's newcomers keeps the batch the same size every time.
            for seq in joining:
                engine.abort(seq.seq_id)
            joining[:] = add_requests(engine, prompts, prompt_len, adapters(decode, prompts), "p")
            results.append(engine.step())

        wall, gpu, top = timed(mixed_step, reps, host_profile)
        for seq in joining:
            engine.abort(seq.seq_id)
    for seq in running:
        engine.abort(seq.seq_id)
    engine.flush()
    compiles = compile_watch().total - compiled
    busy = sum(gpu.values())
    last = results[-1]
    if last is None or last.decode_seqs != decode:
        raise RuntimeError(f"{name}: the timed steps did not run {decode} decodes: {last}")
    row: dict[str, Any] = {"case": name, "decode": decode, "prompt_tokens": prompts * prompt_len}
    row["context"] = context
    row["outputs"] = "async" if async_output else "sync"
    row["overlap"] = overlap
    row["prefill_graphs"] = prefill_graphs is not None
    row["last_step"] = None if last is None else last.__dict__
    row["top_kernels"] = top
    # A compilation while timing stalls the steps it lands in: such a case's numbers are suspect.
    row["kernel_compiles"] = compiles.count
    row |= {"wall_ms": wall, "gpu_ms": busy, "host_ms": max(wall - busy, 0.0)}
    row |= {f"{k}_ms": v for k, v in sorted(gpu.items())}
    print(
        f"{name:<50} wall {wall:7.2f} ms  gpu {busy:7.2f}  "
        + "  ".join(f"{k} {v:.2f}" for k, v in sorted(gpu.items()))
        + f"  last step {row['last_step']}"
        + (f"  ({compiles.count} kernels compiled while timing)" if compiles.count else ""),
        flush=True,
    )
    return row


def launch_costs(hidden: int, tokens: int, reps: int = 200) -> dict[str, float]:
    """Host microseconds per call of the ops an eager step issues most, on small inputs, with
    no sync inside the loop: what each costs the CPU, whatever the GPU does."""
    from kernels import elementwise

    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    w = torch.ones(hidden, device=DEVICE, dtype=torch.bfloat16)
    linear = torch.nn.Linear(hidden, hidden, bias=False, device=DEVICE, dtype=torch.bfloat16)
    compiled = ElementwiseOps.compiled()
    ops: dict[str, Callable[[], object]] = {
        "rms_norm triton": lambda: elementwise.rms_norm(x, w, 1e-5),
        "rms_norm compiled": lambda: compiled.rms_norm(x, w, 1e-5),
        "silu_mul triton": lambda: elementwise.silu_mul(x, x),
        "silu_mul compiled": lambda: compiled.silu_mul(x, x),
        "linear": lambda: linear(x),
        "torch.add": lambda: x + x,
    }
    costs = {}
    for name, op in ops.items():
        for _ in range(10):
            op()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            op()
        costs[name] = (time.perf_counter() - start) / reps * 1e6
        torch.cuda.synchronize()
    print("host us per call: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()), flush=True)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer cases and steps")
    parser.add_argument("--host-profile", action="store_true", help="cProfile the mixed steps")
    parser.add_argument(
        "--cases",
        default="",
        help="comma list of DECODExPROMPTSxPROMPT_LEN (e.g. 256x0x0,240x2x270); "
        "default: the standard cases",
    )
    parser.add_argument("--context", type=int, default=CONTEXT, help="running requests' prompts")
    parser.add_argument("--ranks", default="8,16,32,64", help="adapter ranks, cycled")
    parser.add_argument(
        "--kinds", default="base,attention,all-linear", help="comma list of adapter kinds"
    )
    parser.add_argument(
        "--outputs",
        default="async,sync",
        help="comma list of async (a step's outputs built while the next runs) and sync",
    )
    parser.add_argument(
        "--overlap",
        default="on,off",
        help="comma list of on (the next step launched before this step's tokens are read "
        "back) and off",
    )
    parser.add_argument(
        "--elementwise",
        choices=("kernels", "compiled"),
        default="kernels",
        help="RMSNorm, rotary and SiLU-gate as Triton kernels or through torch.compile",
    )
    parser.add_argument(
        "--prefill-graphs",
        default="on,off",
        help="comma list of on (a mixed step's prompt chunks replay a prefill graph) and off "
        "(they run eagerly); cases without prompts run once",
    )
    parser.add_argument(
        "--lora-kernels",
        choices=("rows", "rows-request-major", "tiled"),
        default="rows",
        help="a decode batch's LoRA through lora_rows.py's kernels (the default), the same with "
        "the request as the grid's slowest axis and decode batches in descending rank "
        "(LoraLaunch.row_request_major), or lora.py's tiled ones",
    )
    args = parser.parse_args()
    ranks = tuple(int(r) for r in args.ranks.split(","))
    config = ModelConfig.from_hf(DUMMY_PRESETS["llama-7b"])
    ops = ElementwiseOps.kernels() if args.elementwise == "kernels" else ElementwiseOps.compiled()
    backends = ModelBackends(TritonPagedAttention(), ops)
    model = build_dummy_model(
        config, 0, torch.bfloat16, DEVICE, draw_on_device=True, backends=backends
    )
    start = time.perf_counter()
    engine = build_engine(
        model,
        EngineConfig(
            gpu_memory_fraction=0.8,
            max_num_seqs=256,
            max_loras=520,
            max_prefill_tokens=8192,
            max_rank=max(ranks),
            prefill_graphs="on" in args.prefill_graphs.split(","),
        ),
        TritonLoraBackend(
            LoraLaunch(
                row_kernels=args.lora_kernels != "tiled",
                row_request_major=args.lora_kernels == "rows-request-major",
            )
        ),
    )
    captured = engine.prefill_graphs
    print(
        f"engine built in {time.perf_counter() - start:.1f} s, prefill graph buckets "
        f"{captured.pairs if captured else None}",
        flush=True,
    )

    def rank_of(index: int) -> int:
        return ranks[index % len(ranks)]

    banks = {
        name: AdapterBank(config.shape, rank_of, torch.bfloat16, DEVICE, 8, targets=t)
        for name, t in TARGET_SETS.items()
    }

    def adapters_of(kind: str) -> Callable[[int, int], list[CanonicalAdapter | None]]:
        def pick(first: int, count: int) -> list[CanonicalAdapter | None]:
            if kind == "base":
                return [None] * count
            return [banks[kind].adapter(first + i, f"{kind}-{first + i}") for i in range(count)]

        return pick

    reps = 5 if args.quick else 15
    cases = [(32, 0, 0), (128, 0, 0), (192, 4, 115)]
    if args.quick:
        cases = [(32, 0, 0), (192, 4, 115)]
    if args.cases:
        cases = [tuple(int(n) for n in c.split("x")) for c in args.cases.split(",")]  # type: ignore[misc]
    rows: list[dict[str, Any]] = [{"launch_costs_us": launch_costs(config.hidden_size, 8)}]
    for decode, prompts, prompt_len in cases:
        graph_choices = args.prefill_graphs.split(",") if prompts else ["on"]
        for kind, outputs, graphs, overlap in itertools.product(
            args.kinds.split(","), args.outputs.split(","), graph_choices, args.overlap.split(",")
        ):
            label = f"decode {decode}" + (f" + {prompts}x{prompt_len}" if prompts else "")
            if prompts:
                label += f" pg-{graphs}"
            rows.append(
                run_case(
                    engine,
                    f"{label} {kind} {outputs} ov-{overlap}",
                    decode,
                    prompts,
                    prompt_len,
                    adapters_of(kind),
                    reps,
                    args.host_profile and kind == "attention",
                    args.context,
                    async_output=outputs == "async",
                    prefill_graphs=captured if graphs == "on" else None,
                    overlap=overlap == "on",
                )
            )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_step.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'case':<50} wall_ms  gpu_ms  host_ms  gemm  lora  attn")
    for r in rows[1:]:
        lora = r.get("lora_shrink_ms", 0.0) + r.get("lora_expand_ms", 0.0)
        print(
            f"{r['case']:<50} {r['wall_ms']:7.2f} {r['gpu_ms']:7.2f} {r['host_ms']:7.2f}"
            f" {r.get('gemm_ms', 0.0):5.2f} {lora:5.2f} {r.get('attention_ms', 0.0):5.2f}"
        )


if __name__ == "__main__":
    main()
