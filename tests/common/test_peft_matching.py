"""Our regex-free name matching resolves exactly as PEFT's regex-based code does.

Oracles: PEFT's own `get_pattern_key` (rank_pattern / alpha_pattern) and the set of modules
PEFT wraps with LoRA (`get_peft_model` on a small Llama) for target_modules,
exclude_modules, layers_to_transform and layers_pattern."""

from __future__ import annotations

import itertools
import json
import warnings
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.utils.other import get_pattern_key
from transformers import LlamaConfig, LlamaForCausalLM

from services.common.base_model import LINEAR_MODULES, BaseModelShape, module_block
from services.common.peft_config import (
    AdapterValidationError,
    parse_config,
    pattern_key_for,
    selected_modules,
)

LAYERS = 12  # two-digit indices, so that layers.1 vs layers.11 shows
NAMES = [
    f"model.layers.{layer}.{module_block(proj)}.{proj}"
    for layer in range(LAYERS)
    for proj in LINEAR_MODULES
]
KEYS = [
    "q_proj",
    "down_proj",
    "self_attn.q_proj",
    "mlp.down_proj",
    "layers.1.self_attn.q_proj",
    "layers.11.self_attn.q_proj",
    "1.self_attn.q_proj",
    "model.layers.3.mlp.down_proj",
    "base_model.model.model.layers.3.mlp.down_proj",
    "q.proj",  # `.` is any character in PEFT's regex: matches q_proj
    "layers.1.self_attn.._proj",
    "layers.1",
    "proj",
    "_proj",
    ".q_proj",
    "q_proj.",
    "Q_PROJ",
    "mlp",
    "",
    "model.layers.10.mlp.up_proj",
    "odel.layers.10.mlp.up_proj",
    "o_proj",
    "gate-proj",
]


def _peft_choice(keys: list[str], name: str) -> str | None:
    """PEFT's get_pattern_key returns the name itself when no key matches."""
    found = get_pattern_key(keys, name)
    return found if found in keys else None


@pytest.mark.parametrize("key", KEYS)
def test_single_key_matches_what_peft_matches(key: str) -> None:
    ours = [name for name in NAMES if pattern_key_for([key], name) is not None]
    peft = [name for name in NAMES if _peft_choice([key], name) is not None]
    assert ours == peft


def test_first_matching_key_in_order_wins_as_in_peft() -> None:
    pairs = list(itertools.permutations(KEYS[:10], 2))
    for keys in pairs:
        for name in NAMES:
            assert pattern_key_for(list(keys), name) == _peft_choice(list(keys), name), (keys, name)


SMALL: dict[str, Any] = {
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
}
SHAPE = BaseModelShape.from_hf_config(SMALL)

TARGET_CASES: dict[str, dict[str, Any]] = {
    "names": {"target_modules": ["q_proj", "down_proj"]},
    "dotted-suffix": {"target_modules": ["self_attn.k_proj", "layers.1.mlp.up_proj"]},
    "full-name": {"target_modules": ["model.layers.10.self_attn.o_proj"]},
    "all-linear": {"target_modules": "all-linear"},
    "all-linear-upper": {"target_modules": "ALL-LINEAR"},
    "string-full-name": {"target_modules": "model.layers.2.mlp.gate_proj"},
    "string-wildcard": {"target_modules": "model.layers.1.self_attn.._proj"},
    "layers-list": {"target_modules": ["v_proj", "up_proj"], "layers_to_transform": [1, 10]},
    "layers-int": {"target_modules": ["o_proj"], "layers_to_transform": 11},
    "layers-pattern": {
        "target_modules": ["q_proj"],
        "layers_to_transform": [0, 3],
        "layers_pattern": ["h", "layers"],
    },
    "layers-pattern-dotted": {
        "target_modules": ["gate_proj"],
        "layers_to_transform": [5],
        "layers_pattern": "model.layers",
    },
    "layers-exact-name-ignores-layers": {
        "target_modules": ["model.layers.4.self_attn.q_proj", "k_proj"],
        "layers_to_transform": [1],
    },
    "exclude-list": {
        "target_modules": "all-linear",
        "exclude_modules": ["q_proj", "layers.2.mlp.up_proj"],
    },
    "exclude-string": {
        "target_modules": ["v_proj"],
        "exclude_modules": "model.layers.1.self_attn.v_proj",
    },
    "unmatched-entry-ignored": {"target_modules": ["q_proj", "query_key_value"]},
    # With layers_to_transform, a suffix entry selects only names with "<segment>.<index>.":
    # not the modules outside the decoder layers, nor a decoder layer itself.
    "layers-skip-modules-outside-layers": {
        "target_modules": ["q_proj", "embed_tokens", "norm"],
        "layers_to_transform": [0],
    },
    "layers-skip-the-decoder-layer-itself": {
        "target_modules": ["q_proj", "layers.0"],
        "layers_to_transform": [0],
    },
}


def _peft_targets(lora: dict[str, Any]) -> set[str]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(LlamaForCausalLM(LlamaConfig(**SMALL)), LoraConfig(r=2, **lora))
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix)
        for name, module in model.named_modules()
        if isinstance(module, LoraLinear)
    }


@pytest.mark.parametrize("lora", TARGET_CASES.values(), ids=TARGET_CASES.keys())
def test_selected_modules_are_the_ones_peft_wraps(lora: dict[str, Any]) -> None:
    opts = parse_config(json.dumps({"peft_type": "LORA", "r": 2, **lora}))
    assert set(selected_modules(opts, SHAPE)) == _peft_targets(lora)


@pytest.mark.parametrize(
    "lora, named",
    [
        ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
        ({"target_modules": ["embed_tokens"]}, "embed_tokens"),
        ({"target_modules": ["mlp"]}, "not a linear layer"),
        ({"target_modules": "q_proj"}, "selects no module"),
    ],
)
def test_selections_peft_would_refuse_or_we_do_not_serve_are_refused(
    lora: dict[str, Any], named: str
) -> None:
    opts = parse_config(json.dumps({"peft_type": "LORA", "r": 2, **lora}))
    with pytest.raises(AdapterValidationError) as refused:
        selected_modules(opts, SHAPE)
    assert refused.value.key == "target_modules"
    assert named in refused.value.reason


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": "all-linear", "layers_to_transform": []},
        {"target_modules": "all-linear", "layers_pattern": "layers"},
        {"target_modules": ["q_proj"], "layers_pattern": "layers"},
    ],
    ids=["layers-with-string-target", "pattern-with-string-target", "pattern-without-layers"],
)
def test_layer_options_peft_refuses_are_refused(lora: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        LoraConfig(r=2, **lora)  # PEFT's own refusal: the oracle
    with pytest.raises(AdapterValidationError) as refused:
        parse_config(json.dumps({"peft_type": "LORA", "r": 2, **lora}))
    assert refused.value.key in lora


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "blocks"},
        {"target_modules": ["q_proj", "mlp"], "layers_to_transform": [3]},
    ],
    ids=["layers-pattern-matching-nothing", "layer-index-on-a-block"],
)
def test_layer_selections_peft_cannot_load_are_refused(lora: dict[str, Any]) -> None:
    # PEFT: "Target modules not found" for the first, "LlamaMLP is not supported" for the
    # second. The oracle is its refusal; ours must name target_modules.
    with pytest.raises(ValueError):
        _peft_targets(lora)
    opts = parse_config(json.dumps({"peft_type": "LORA", "r": 2, **lora}))
    with pytest.raises(AdapterValidationError) as refused:
        selected_modules(opts, SHAPE)
    assert refused.value.key == "target_modules"
