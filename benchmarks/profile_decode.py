"""Where a decode step's time goes, at Llama-7B shapes: host phases and the top GPU kernels.

python -m benchmarks.profile_decode [--batch 32] [--lora]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.decode_bench import DEVICE, PROMPT_LEN, RANKS, random_adapter
from services.common.base_model import DUMMY_PRESETS
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions, sample
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.engine.setup import build_engine
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.backends import ModelBackends
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model


def phases(engine: Engine) -> dict[str, float]:
    """One decode step, phase by phase, with a device sync after each (milliseconds)."""
    marks = [time.perf_counter()]

    def mark() -> None:
        torch.cuda.synchronize()
        marks.append(time.perf_counter())

    step = engine.scheduler.schedule()
    seqs = step.prefill + step.decode
    mark()
    batch = engine.build_batch(seqs)
    mark()
    assert engine.graphs is not None
    logits = engine.graphs.run(batch)
    mark()
    sampled = sample(
        logits, [s.options for s in seqs], [s.seed for s in seqs], [len(s.output_ids) for s in seqs]
    )
    mark()
    for seq, token, logprob in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
        seq.num_cached += 1  # what launching the step counts in the engine (inflight_step.py)
        engine._append(seq, token, logprob)
    engine.flush()  # their outputs, built here rather than during the next step
    mark()
    names = ("schedule", "build_batch", "graph_replay", "sample", "outputs")
    return {n: (b - a) * 1e3 for n, a, b in zip(names, marks[:-1], marks[1:], strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--no-fuse", action="store_true", help="elementwise ops unfused")
    args = parser.parse_args()
    config = ModelConfig.from_hf(DUMMY_PRESETS["llama-7b"])
    backends = ModelBackends.for_device(DEVICE, fuse_elementwise=not args.no_fuse)
    model = build_dummy_model(
        config, 0, torch.bfloat16, DEVICE, draw_on_device=True, backends=backends
    )
    # Phase by phase needs each step's tokens back before the next is built: no overlap.
    settings = EngineConfig(
        gpu_memory_fraction=0.5, max_num_seqs=args.batch, overlap_schedule=False
    )
    engine = build_engine(model, settings)
    for i in range(args.batch):
        adapter = random_adapter(config, RANKS[i % 4], i) if args.lora else None
        opts = SamplingOptions(max_new_tokens=64, ignore_eos=True)
        engine.add(
            Sequence(
                f"p{i}",
                list(range(3, 3 + PROMPT_LEN)),
                opts,
                ByteTokenizer(),
                lambda _: None,
                adapter,
            )
        )
    while any(s.prefilling for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        phases(engine)
    rows = [phases(engine) for _ in range(10)]
    for name in rows[0]:
        print(f"{name:>13}: {sorted(r[name] for r in rows)[5]:7.3f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60)
    )


if __name__ == "__main__":
    main()
