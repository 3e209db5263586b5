"""The HF PEFT baseline: a server loop as a PEFT user would write it, with static batching.

The loop takes up to `batch_size` requests that have arrived (first come, first served), runs
one `generate` for them with each row's adapter (`adapter_names`, PEFT's mixed-adapter batch
inference) and `max_new_tokens` = the batch's largest output length, and only then looks at
the queue again. Requests arriving meanwhile wait for the whole batch; rows that asked for
fewer tokens keep decoding (wasted work) until the longest is done. No continuous batching, no
paged KV cache, every adapter resident in PEFT's own modules.

Timings are read at every decoding step (a stopping criterion that never stops), so a row's
first token and finish are when its tokens existed, as if streamed: that flatters the
baseline, which in a plain server would return a row only when its batch ends.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.serving.metrics import RequestRecord
from benchmarks.workload import Trace, prompt_tokens
from services.common.base_model import DUMMY_PRESETS, TARGET_MODULES

PAD_ID = 0


def build_peft_model(
    preset: str,
    ranks: dict[int, int],
    device: torch.device,
    targets: Sequence[str] = TARGET_MODULES,
) -> Any:
    """HF Llama with random weights and one PEFT LoRA adapter per key of `ranks` (adapter
    index -> rank), named `a{index}`, on `targets` like the engine's adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_default_dtype(dtype)  # build a 7B model in bf16 straight on the GPU
    try:
        with torch.device(device):
            base = LlamaForCausalLM(LlamaConfig(**DUMMY_PRESETS[preset]))
    finally:
        torch.set_default_dtype(torch.float32)
    model: Any = None
    for index, rank in sorted(ranks.items()):
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=list(targets),
            init_lora_weights=False,
        )
        if model is None:
            model = get_peft_model(base, config, adapter_name=f"a{index}")
        else:
            model.add_adapter(f"a{index}", config)
    return model.to(device, dtype).eval()


def _step_recorder(
    rows: list[RequestRecord], prompt_width: int, clock: Callable[[], float], timeout_s: float
) -> Any:
    from transformers import StoppingCriteria

    class StepRecorder(StoppingCriteria):
        """Notes each row's tokens as they appear; stops everything only at the timeout."""

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            now, step = clock(), input_ids.shape[1] - prompt_width
            for record in rows:
                if step <= record.output_len:
                    record.on_tokens(now, 1)
                    if step == record.output_len:
                        record.finish_s = now
            return torch.full((len(rows),), now > timeout_s, device=input_ids.device)

    return StepRecorder()


def _run_batch(
    model: Any, rows: list[RequestRecord], prompts: list[list[int]], recorder: Any
) -> None:
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, prompt in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[j, width - len(prompt) :] = torch.tensor(prompt)
        mask[j, width - len(prompt) :] = 1
    longest = max(r.output_len for r in rows)
    with torch.no_grad():
        model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            adapter_names=[f"a{r.adapter}" for r in rows],
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=PAD_ID,
            stopping_criteria=[recorder],
        )


def warm_up(model: Any, adapters: list[int]) -> None:
    """One short batch before the timed run: first-call costs (CUDA context, cuBLAS handles)
    stay out of it, as the engine's warm-up keeps kernel compilation out of its runs."""
    rows = [RequestRecord(i, adapter, 0.0, 2) for i, adapter in enumerate(adapters)]
    prompts = [[3 + i for i in range(8)] for _ in rows]
    _run_batch(model, rows, prompts, _step_recorder(rows, 8, lambda: 0.0, float("inf")))


def replay(
    model: Any, trace: Trace, batch_size: int, timeout_s: float | None = None, progress: bool = True
) -> tuple[list[RequestRecord], float]:
    requests, prompts = trace.requests, prompt_tokens(trace)
    records = [RequestRecord(r.index, r.adapter, r.arrival_s, r.output_len) for r in requests]
    limit = timeout_s if timeout_s is not None else float("inf")
    start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - start

    queue: deque[int] = deque()
    sent = 0
    with tqdm(total=len(requests), desc="hf-peft", unit="req", disable=not progress) as bar:
        while (sent < len(requests) or queue) and clock() <= limit:
            while sent < len(requests) and requests[sent].arrival_s <= clock():
                queue.append(sent)
                sent += 1
            if not queue:
                time.sleep(max(0.0, min(requests[sent].arrival_s, limit) - clock()))
                continue
            batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
            rows = [records[i] for i in batch]
            width = max(len(prompts[i]) for i in batch)
            _run_batch(
                model, rows, [prompts[i] for i in batch], _step_recorder(rows, width, clock, limit)
            )
            bar.update(sum(r.finish_s is not None for r in rows))
    duration = clock()
    for record in records:
        if record.finish_s is None:
            record.error = "not served before the run's timeout"
    return records, duration
