"""Training the demo's models on this CPU in seconds, with Hugging Face transformers and PEFT
(the same libraries the tests use as their oracle, not the worker's own code).

The base model, a tiny Llama over bytes, learns to echo its prompt (demo/behaviours.py); each
adapter, a LoRA on every linear layer of that base, learns its own behaviour. Training stops
as soon as the model does its behaviour on the demo's prompts, with a margin that keeps the
worker's greedy choice the same as HF's, and on most held-out phrases; a step cap bounds it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from demo.behaviours import DEMO_PROMPTS, Behaviour, prompt_of, random_phrase

logger = logging.getLogger(__name__)

BOS, EOS, PAD = 1, 2, 0
BYTE_OFFSET = 3  # ids 3..258 are the 256 bytes, as the worker's ByteTokenizer has them
IGNORE = -100  # a label HF's loss skips

# A tiny Llama over bytes: about 0.1M parameters, a few milliseconds a step on one core.
MODEL_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 259,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": PAD,
    "tie_word_embeddings": False,
}
LORA_RANK = 8


@dataclass(frozen=True)
class Schedule:
    """How one model is trained; part of the cache key (demo/artifacts.py)."""

    lr: float
    max_steps: int
    batch_size: int = 32
    seed: int = 0


BASE_SCHEDULE = Schedule(lr=3e-3, max_steps=2000)
ADAPTER_SCHEDULE = Schedule(lr=5e-3, max_steps=800)
CHECK_EVERY = 25
HELD_OUT = 48
HELD_OUT_ACCURACY = 0.9
# Logit lead of the right token over the next one on the demo's prompts: far above the
# rounding differences between HF's forward pass and the worker's, so both choose alike.
MIN_MARGIN = 1.0


@dataclass(frozen=True)
class TrainReport:
    steps: int
    seconds: float
    held_out_accuracy: float
    learned: bool  # the stop rule was met before the step cap


def encode(text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode()]


def make_batch(texts: Sequence[str], behaviour: Behaviour) -> dict[str, torch.Tensor]:
    """Prompt and answer of each text, right-padded; only the answer tokens are labelled."""
    rows, labels = [], []
    for text in texts:
        prompt = [BOS, *encode(prompt_of(text))]
        answer = [*encode(behaviour(text)), EOS]
        rows.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    width = max(map(len, rows))
    return {
        "input_ids": torch.tensor([r + [PAD] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([r + [IGNORE] * (width - len(r)) for r in labels]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
    }


@torch.no_grad()
def answer_margins(
    model: torch.nn.Module, texts: Sequence[str], behaviour: Behaviour
) -> list[float]:
    """Per text, the smallest lead of the right token's logit over the best other one, over
    its whole answer (teacher-forced): positive exactly when greedy decoding gives the answer."""
    batch = make_batch(texts, behaviour)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]
    answered = targets != IGNORE
    right = logits.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2)
    others = logits.scatter(2, targets.clamp(min=0).unsqueeze(2), float("-inf")).amax(2)
    lead = torch.where(answered, right - others, torch.inf)
    return lead.amin(1).tolist()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread: tiny matrices gain nothing from more, and on a loaded machine
    threads that wait for each other make each step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(model: torch.nn.Module, behaviour: Behaviour, schedule: Schedule) -> TrainReport:
    """Train the parameters of `model` that require grad until `behaviour` is learned."""
    rng = random.Random(schedule.seed)
    held_out = [random_phrase(random.Random(f"held-out-{i}")) for i in range(HELD_OUT)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=0.0)
    start = time.monotonic()
    step, accuracy, learned = 0, 0.0, False
    model.train()
    while step < schedule.max_steps and not learned:
        step += 1
        batch = make_batch([random_phrase(rng) for _ in range(schedule.batch_size)], behaviour)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % CHECK_EVERY == 0:
            model.eval()
            demo_ok = min(answer_margins(model, DEMO_PROMPTS, behaviour)) >= MIN_MARGIN
            margins = answer_margins(model, held_out, behaviour)
            accuracy = sum(m > 0 for m in margins) / len(margins)
            learned = demo_ok and accuracy >= HELD_OUT_ACCURACY
            model.train()
            logger.debug("step %d: loss %.3f, held-out %.2f", step, loss.item(), accuracy)
    model.eval()
    return TrainReport(step, time.monotonic() - start, accuracy, learned)


def train_base(
    folder: Path, behaviour: Behaviour, schedule: Schedule = BASE_SCHEDULE
) -> TrainReport:
    """Train the base model from scratch and save it as a Hugging Face folder (config.json,
    model.safetensors; the tokenizer files are the caller's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with one_thread(), torch.random.fork_rng():
        torch.manual_seed(schedule.seed)
        model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG))
        report = train(model, behaviour, schedule)
    model.save_pretrained(folder)
    return report


def train_adapter(
    base_folder: Path, folder: Path, behaviour: Behaviour, schedule: Schedule = ADAPTER_SCHEDULE
) -> TrainReport:
    """Train a LoRA on every linear layer of the base and save it with PEFT's
    `save_pretrained` (adapter_config.json, adapter_model.safetensors)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with one_thread(), torch.random.fork_rng():
        torch.manual_seed(schedule.seed)
        base = LlamaForCausalLM.from_pretrained(base_folder)
        config = LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear", lora_dropout=0.0
        )
        model = get_peft_model(base, config)
        report = train(model, behaviour, schedule)
    model.save_pretrained(str(folder))
    return report
