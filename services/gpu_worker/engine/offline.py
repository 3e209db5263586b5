"""Run the engine in-process, without gRPC: for tests, benchmarks and the GPU oracle check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import FinishReason, Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import Tokenizer


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    outputs: list[StepOutput] = field(default_factory=list)


def generate_offline(
    engine: Engine,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    options: list[SamplingOptions],
    adapters: list[CanonicalAdapter | None],
) -> list[Completion]:
    """Submit every request at once, step until all finish, return each one's completion."""
    completions = [Completion() for _ in prompts]

    def collector(done: Completion) -> Callable[[StepOutput], None]:
        def sink(out: StepOutput) -> None:
            if out.error is not None:
                raise out.error
            done.outputs.append(out)
            done.token_ids += out.token_ids
            done.text += out.text
            done.logprobs += out.logprobs
            done.finish_reason = out.finish_reason

        return sink

    for i, (prompt, opts, adapter) in enumerate(zip(prompts, options, adapters, strict=True)):
        seq = Sequence(f"offline-{i}", prompt, opts, tokenizer, collector(completions[i]), adapter)
        engine.add(seq)
    while engine.has_work():
        engine.step()
    return completions
