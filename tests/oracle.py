"""The independent oracle: Hugging Face transformers + PEFT on the same weights, fp32, CPU.

Builds a tiny random Llama (ours and HF's from one state dict), PEFT adapters of mixed ranks
saved as real PEFT folders, and greedy completions computed by HF one request at a time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from services.gpu_worker.model.backends import ModelBackends
from services.gpu_worker.model.model import LlamaForCausalLM as OurLlama
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model, hf_state_dict

TINY_MHA: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 259,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
TINY_GQA: dict[str, Any] = {
    **TINY_MHA,
    "hidden_size": 128,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
}


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    alpha: int
    targets: tuple[str, ...] | str  # a list of module names, or PEFT's "all-linear"
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)


MIXED_ADAPTERS = (
    AdapterSpec("r8", 8, 16, ("q_proj", "v_proj")),
    AdapterSpec("r16", 16, 8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    AdapterSpec("r32-rslora", 32, 32, ("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora=True),
    AdapterSpec("r64", 64, 128, ("k_proj", "o_proj")),
)


def build_pair(
    hf_config: dict[str, Any], seed: int = 0, backends: ModelBackends | None = None
) -> tuple[OurLlama, LlamaForCausalLM]:
    """Our model with seeded random weights (computing with `backends`, the CPU's unless
    given), and HF's LlamaForCausalLM holding the same."""
    ours = build_dummy_model(
        ModelConfig.from_hf(hf_config),
        seed,
        torch.float32,
        torch.device("cpu"),
        backends=backends,
    )
    hf = LlamaForCausalLM(LlamaConfig(**hf_config))
    hf.load_state_dict(hf_state_dict(ours))
    return ours, hf.eval()


def make_peft_adapters(
    hf: LlamaForCausalLM, specs: tuple[AdapterSpec, ...], folder: Path, seed: int = 0
) -> tuple[PeftModel, dict[str, Path]]:
    """A PeftModel holding every adapter (random, non-zero B), each saved as a PEFT folder."""
    torch.manual_seed(seed)
    peft_model: PeftModel | None = None
    paths: dict[str, Path] = {}
    for spec in specs:
        cfg = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=spec.targets if isinstance(spec.targets, str) else list(spec.targets),
            use_rslora=spec.use_rslora,
            rank_pattern=dict(spec.rank_pattern),
            alpha_pattern=dict(spec.alpha_pattern),
            init_lora_weights=False,
        )
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(hf), cfg, adapter_name=spec.name)
        else:
            peft_model.add_adapter(spec.name, cfg)
        paths[spec.name] = folder / spec.name
    assert peft_model is not None
    for spec in specs:
        peft_model.save_pretrained(str(folder / "_all"), selected_adapters=[spec.name])
        (folder / "_all" / spec.name).rename(paths[spec.name])
    return peft_model.eval(), paths


@torch.no_grad()
def greedy_oracle(
    peft_model: PeftModel, prompt: list[int], adapter: str | None, max_new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """HF + PEFT greedy tokens for one request, and the logits [max_new_tokens, V] of each step."""
    ids = list(prompt)
    steps = []
    for _ in range(max_new_tokens):
        batch = torch.tensor([ids])
        if adapter is None:
            with peft_model.disable_adapter():
                logits = peft_model(input_ids=batch).logits[0, -1]
        else:
            peft_model.set_adapter(adapter)
            logits = peft_model(input_ids=batch).logits[0, -1]
        steps.append(logits.float())
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :], torch.stack(steps)
