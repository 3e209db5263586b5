"""`parse_config` and `selected_modules` key by key: what each key reads as, PEFT's defaults
for the keys left out (PEFT's own LoraConfig is the oracle), limits at their edges, and the
refusal messages, which name the key and quote what was sent, cut short."""

from __future__ import annotations

import json
from typing import Any

import pytest
from peft import LoraConfig

from services.common.base_model import BaseModelShape
from services.common.peft_config import (
    CONFIG_FILE,
    AdapterValidationError,
    LoraOptions,
    parse_config,
    selected_modules,
)

BASE: dict[str, Any] = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
SHAPE = BaseModelShape(num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4)
WITH_MLP = BaseModelShape(2, 8, 2, 1, 4, intermediate_size=12)
ONLY_PLAIN = (
    "only module names and dotted paths (e.g. 'q_proj', 'layers.3.mlp.down_proj') are supported"
)


def _parse(**changes: Any) -> LoraOptions:
    return parse_config(json.dumps({k: v for k, v in {**BASE, **changes}.items() if v is not None}))


def _refusal(text: str) -> AdapterValidationError:
    with pytest.raises(AdapterValidationError) as refused:
        parse_config(text)
    return refused.value


def test_every_handled_key_reads_as_written():
    opts = _parse(
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["layers.0.self_attn.q_proj"],
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        rank_pattern={"q_proj": 1},
        alpha_pattern={"v_proj": 3.5},
        base_model_name_or_path="meta/llama",
    )
    assert opts == LoraOptions(
        r=4,
        alpha=16.0,
        use_rslora=True,
        rank_pattern={"q_proj": 1},
        alpha_pattern={"v_proj": 3.5},
        target_modules=frozenset({"q_proj", "v_proj"}),
        exclude_modules=frozenset({"layers.0.self_attn.q_proj"}),
        layers_to_transform=frozenset({0, 1}),
        layers_pattern=("layers",),
        base_model="meta/llama",
    )


def test_keys_left_out_take_peft_defaults():
    opts = parse_config(json.dumps({"target_modules": ["q_proj"]}))  # no peft_type, r, alpha
    peft = LoraConfig()
    assert (opts.r, opts.alpha, opts.use_rslora) == (peft.r, peft.lora_alpha, peft.use_rslora)
    assert (opts.rank_pattern, opts.alpha_pattern, opts.exclude_modules) == ({}, {}, None)
    assert (opts.layers_to_transform, opts.layers_pattern, opts.base_model) == (None, (), "")


@pytest.mark.parametrize(("value", "expected"), [(None, ""), ("", ""), (5, "5"), ("m/x", "m/x")])
def test_base_model_name_reads_as_text(value, expected):
    assert _parse(base_model_name_or_path=value).base_model == expected


def test_the_smallest_rank_is_one():
    assert _parse(r=1, rank_pattern={"q_proj": 1}).r == 1


def test_entry_limits_are_inclusive():
    names = ["q_proj", *(f"m{i}" for i in range(1023))]
    assert len(_parse(target_modules=names).target_modules) == 1024
    assert len(_parse(exclude_modules=names).exclude_modules or ()) == 1024
    patterns = {f"layers.{i}.q_proj": 2 for i in range(1024)}
    assert len(_parse(rank_pattern=patterns).rank_pattern) == 1024
    over = _refusal(json.dumps({**BASE, "target_modules": [*names, "m-last"]}))
    assert (over.key, over.reason) == ("target_modules", "1025 entries, over 1024")
    patterns["one.more"] = 2
    over = _refusal(json.dumps({**BASE, "rank_pattern": patterns}))
    assert (over.key, over.reason) == ("rank_pattern", "1025 entries, over 1024")


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", None])
def test_plain_lora_initializations_are_accepted(init):
    assert _parse(init_lora_weights=init).r == 4


@pytest.mark.parametrize("init", [1, 0, "true", "pissa"])
def test_other_initializations_are_refused(init):
    # 1 and 0 are not true and false: PEFT itself fails on them ('int' has no 'lower').
    refused = _refusal(json.dumps({**BASE, "init_lora_weights": init}))
    assert refused.key == "init_lora_weights"


@pytest.mark.parametrize(
    ("changes", "key", "reason"),
    [
        ({"peft_type": "IA3"}, "peft_type", "only LORA is supported, got 'IA3'"),
        ({"use_dora": True}, "use_dora", "is set (True); not supported"),
        ({"bias": "all"}, "bias", "only 'none' is supported, got 'all'"),
        (
            {"init_lora_weights": "pissa"},
            "init_lora_weights",
            "'pissa' modifies the base weights or the forward; only plain LoRA is supported "
            "(save a PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA adapter converted to LoRA)",
        ),
        ({"use_rslora": "yes"}, "use_rslora", "must be true or false, got 'yes'"),
        ({"new_thing": [1]}, "new_thing", "unknown option, set ([1]); not supported"),
        ({"r": "8"}, "r", "must be a positive integer, got '8'"),
        ({"lora_alpha": "x"}, "lora_alpha", "must be a finite number, got 'x'"),
        ({"target_modules": 5}, "target_modules", "must be a list of names, got 5"),
        ({"target_modules": None}, "target_modules", "missing; name the modules LoRA is on"),
        (
            {"target_modules": "q.*"},
            "target_modules",
            f"'q.*' contains regular-expression characters '*'; {ONLY_PLAIN}",
        ),
        (
            {"rank_pattern": {"a+b(": 2}},
            "rank_pattern.a+b(",
            f"'a+b(' contains regular-expression characters '(+'; {ONLY_PLAIN}",
        ),
        ({"rank_pattern": [1]}, "rank_pattern", "must be an object of pattern -> value"),
        (
            {"rank_pattern": {"q_proj": 0}},
            "rank_pattern.q_proj",
            "must be a positive integer, got 0",
        ),
        (
            {"alpha_pattern": {"q_proj": "2"}},
            "alpha_pattern.q_proj",
            "must be a finite number, got '2'",
        ),
        (
            {"target_modules": "all-linear", "layers_to_transform": [0]},
            "layers_to_transform",
            "cannot be used when target_modules is a string (PEFT)",
        ),
        ({"layers_pattern": "layers"}, "layers_pattern", "needs layers_to_transform (PEFT)"),
        (
            {"layers_to_transform": [-1]},
            "layers_to_transform",
            "must be a layer index or a list of them, got [-1]",
        ),
        (
            {"layers_to_transform": [0], "layers_pattern": 3},
            "layers_pattern",
            "must be a name or a list of names, got 3",
        ),
    ],
)
def test_refusal_names_the_key_and_quotes_the_value(changes, key, reason):
    config = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    refused = _refusal(json.dumps(config))
    assert (refused.key, refused.reason, str(refused)) == (key, reason, f"{key}: {reason}")


def test_a_config_that_is_not_an_object_is_refused():
    refused = _refusal("[1]")
    assert (refused.key, refused.reason) == (CONFIG_FILE, "must be a JSON object")


def test_quoted_values_are_cut_to_80_characters():
    fits = "x" * 78  # its repr, quotes included, is 80 characters
    assert _refusal(json.dumps({**BASE, "r": fits})).reason.endswith(f"got '{fits}'")
    over = "y" * 79
    reason = _refusal(json.dumps({**BASE, "r": over})).reason
    assert reason.endswith("got '" + "y" * 76 + "...")


def test_keys_in_messages_are_cut_to_160_characters():
    whole = AdapterValidationError("k" * 160, "why")
    assert (whole.key, str(whole)) == ("k" * 160, "k" * 160 + ": why")
    cut = AdapterValidationError("k" * 161, "why")
    assert (cut.key, str(cut)) == ("k" * 157 + "...", "k" * 157 + "...: why")


# ---- selected_modules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "reason"),
    [
        (
            ["q_proj", "lm_head"],
            "'lm_head' selects lm_head: LoRA on the output head (lm_head) is not supported",
        ),
        (
            ["embed_tokens"],
            "'embed_tokens' selects model.embed_tokens: LoRA on embeddings (embed_tokens) is "
            "not supported",
        ),
        (
            ["mlp"],
            "'mlp' selects model.layers.0.mlp: is not a linear layer; LoRA goes on "
            "q/k/v/o/gate/up/down_proj",
        ),
        (
            "q_proj",
            "'q_proj' selects no module of the base model (PEFT matches a string against whole "
            "names such as model.layers.0.self_attn.q_proj)",
        ),
    ],
)
def test_selection_refusals_say_what_was_selected(targets, reason):
    with pytest.raises(AdapterValidationError) as refused:
        selected_modules(_parse(target_modules=targets), SHAPE)
    assert (refused.value.key, refused.value.reason) == ("target_modules", reason)


def test_mlp_targets_need_a_known_mlp_width_and_attention_targets_do_not():
    with pytest.raises(AdapterValidationError) as refused:
        selected_modules(_parse(target_modules=["q_proj", "up_proj"]), SHAPE)
    assert (refused.value.key, refused.value.reason) == (
        "target_modules",
        "up_proj: the base model's intermediate_size is unknown",
    )
    attention = selected_modules(_parse(target_modules=["q_proj", "o_proj"]), SHAPE)
    assert len(attention) == 4  # two layers, two projections
    narrow = BaseModelShape(2, 8, 2, 1, 4, intermediate_size=1)
    assert len(selected_modules(_parse(target_modules=["up_proj"]), narrow)) == 2
    assert len(selected_modules(_parse(target_modules=["up_proj"]), WITH_MLP)) == 2
