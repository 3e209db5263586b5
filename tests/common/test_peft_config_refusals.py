"""Every adapter_config.json key, with hostile values: each refusal is an AdapterValidationError
naming the key (never a RecursionError, a regex stall, or a half-right adapter)."""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from services.common.base_model import LINEAR_MODULES, BaseModelShape, load_hf_config
from services.common.bounded_json import loads_bounded, nesting_depth
from services.common.lora_format import CanonicalAdapter, read_safetensors_metadata
from services.common.peft_adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterValidationError,
    canonicalize,
)
from services.common.random_adapters import save_random_peft_adapter

TINY = BaseModelShape.from_hf_config(load_hf_config("tiny"))
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def qkvo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], bytes]:
    folder = save_random_peft_adapter(tmp_path_factory.mktemp("a") / "qkvo", TINY, 8, seed=1)
    return json.loads((folder / CONFIG_FILE).read_text()), (folder / WEIGHTS_FILE).read_bytes()


@pytest.fixture(scope="module")
def all_linear(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], bytes]:
    folder = tmp_path_factory.mktemp("a") / "all"
    save_random_peft_adapter(folder, TINY, 4, seed=2, targets=LINEAR_MODULES)
    return json.loads((folder / CONFIG_FILE).read_text()), (folder / WEIGHTS_FILE).read_bytes()


def _refusal(config: dict[str, Any] | str, weights: bytes) -> AdapterValidationError:
    text = config if isinstance(config, str) else json.dumps(config)
    with pytest.raises(AdapterValidationError) as refused:
        canonicalize("x", text, weights, TINY, max_rank=16)
    return refused.value


DEEP = "[" * 100_000 + "]" * 100_000
# name: (changes to the good q/k/v/o config, key the refusal names, pattern in its reason)
CONFIG_CASES: dict[str, tuple[dict[str, Any] | str, str, str]] = {
    "peft-type": ({"peft_type": "IA3"}, "peft_type", "only LORA"),
    "bias": ({"bias": "lora_only"}, "bias", "only 'none'"),
    "use-dora": ({"use_dora": True}, "use_dora", "not supported"),
    "modules-to-save": ({"modules_to_save": ["lm_head"]}, "modules_to_save", "not supported"),
    "lora-bias": ({"lora_bias": True}, "lora_bias", "not supported"),
    "layer-replication": ({"layer_replication": [[0, 2]]}, "layer_replication", "not supported"),
    "trainable-tokens": ({"trainable_token_indices": [1]}, "trainable_token_indices", "not"),
    "megatron": ({"megatron_config": {"a": 1}}, "megatron_config", "not supported"),
    "init-pissa": ({"init_lora_weights": "pissa"}, "init_lora_weights", "modifies the base"),
    "init-olora": ({"init_lora_weights": "olora"}, "init_lora_weights", "modifies the base"),
    "init-loftq": ({"init_lora_weights": "loftq"}, "init_lora_weights", "modifies the base"),
    "unknown-set": ({"future_variant": {"on": True}}, "future_variant", "unknown option"),
    "r-zero": ({"r": 0}, "r", "positive integer"),
    "r-negative": ({"r": -8}, "r", "positive integer"),
    "r-string": ({"r": "8"}, "r", "positive integer"),
    "r-float": ({"r": 8.0}, "r", "positive integer"),
    "r-bool": ({"r": True}, "r", "positive integer"),
    "r-huge": (
        {"r": 10**30},
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "shape",
    ),
    "alpha-string": ({"lora_alpha": "16"}, "lora_alpha", "finite number"),
    "alpha-nan": ('"lora_alpha": NaN', "lora_alpha", "finite number"),
    "alpha-inf": ('"lora_alpha": Infinity', "lora_alpha", "finite number"),
    "alpha-overflow": ({"lora_alpha": 1e308}, "lora_alpha", "overflows"),
    "rslora-string": ({"use_rslora": "yes"}, "use_rslora", "true or false"),
    "fan-in-fan-out-int": ({"fan_in_fan_out": 1}, "fan_in_fan_out", "true or false"),
    "target-missing": ({"target_modules": None}, "target_modules", "missing"),
    "target-number": ({"target_modules": 5}, "target_modules", "list of names"),
    "target-regex": ({"target_modules": r".*\.(q|v)_proj"}, "target_modules", "regular-expression"),
    "target-plain-string": ({"target_modules": "q_proj"}, "target_modules", "selects no module"),
    "target-too-many": (
        {"target_modules": [f"m{i}" for i in range(5000)]},
        "target_modules",
        "over 1024",
    ),
    "rank-pattern-list": ({"rank_pattern": [1]}, "rank_pattern", "object of pattern"),
    "rank-pattern-zero": ({"rank_pattern": {"q_proj": 0}}, "rank_pattern.q_proj", "positive"),
    "rank-pattern-string": ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern.q_proj", "positive"),
    "rank-pattern-regex": (
        {"rank_pattern": {"(a+)+$": 4}},
        "rank_pattern.(a+)+$",
        "regular-expression characters",
    ),
    "rank-pattern-backtracking": (
        {"rank_pattern": {"(.*a){25}": 4}},
        "rank_pattern.(.*a){25}",
        "regular-expression characters",
    ),
    "rank-pattern-huge": (
        {"rank_pattern": {f"layers.{i}.q_proj": 8 for i in range(5000)}},
        "rank_pattern",
        "over 1024",
    ),
    "alpha-pattern-nan": ('"alpha_pattern": {"q_proj": NaN}', "alpha_pattern.q_proj", "finite"),
    "alpha-pattern-bool": ({"alpha_pattern": {"q_proj": True}}, "alpha_pattern.q_proj", "finite"),
    "alpha-pattern-regex": (
        {"alpha_pattern": {"q_proj|k_proj": 2}},
        "alpha_pattern.q_proj|k_proj",
        "regular",
    ),
    "layers-string": ({"layers_to_transform": "0"}, "layers_to_transform", "layer index"),
    "layers-negative": ({"layers_to_transform": [-1]}, "layers_to_transform", "layer index"),
    "layers-with-string-target": (
        {"target_modules": "all-linear", "layers_to_transform": [0]},
        "layers_to_transform",
        "target_modules is a string",
    ),
    "layers-empty-with-string-target": (
        {"target_modules": "all-linear", "layers_to_transform": []},
        "layers_to_transform",
        "target_modules is a string",
    ),
    "layers-pattern-with-string-target": (
        {"target_modules": "all-linear", "layers_pattern": "layers"},
        "layers_pattern",
        "target_modules is a string",
    ),
    "layers-pattern-without-layers": (
        {"layers_pattern": "layers"},
        "layers_pattern",
        "needs layers_to_transform",
    ),
    "layers-pattern-regex": (
        {"layers_to_transform": [0], "layers_pattern": "lay(ers)?"},
        "layers_pattern",
        "regular-expression",
    ),
    "layers-pattern-number": (
        {"layers_to_transform": [0], "layers_pattern": 3},
        "layers_pattern",
        "name",
    ),
    "exclude-regex": ({"exclude_modules": ".*q_proj"}, "exclude_modules", "regular-expression"),
    "deep-nesting": ({"extra": "DEEP"}, CONFIG_FILE, "nested 100001 deep"),
}


def _config_text(base: dict[str, Any], change: Any) -> str:
    if isinstance(change, str):  # raw JSON member text (NaN is JSON only to Python's parser)
        key = change.split(":", 1)[0].strip().strip('"')
        rest = json.dumps({k: v for k, v in base.items() if k != key})
        return rest[:-1] + ", " + change + "}"
    if change.get("extra") == "DEEP":
        return json.dumps(base)[:-1] + ', "extra": ' + DEEP + "}"
    merged = {**base, **change}
    return json.dumps({k: v for k, v in merged.items() if v is not None})


@pytest.mark.parametrize("change, key, reason", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_config_refusal_names_the_key(
    qkvo: tuple[dict[str, Any], bytes], change: Any, key: str, reason: str
) -> None:
    config, weights = qkvo
    refused = _refusal(_config_text(config, change), weights)
    assert refused.key == key, str(refused)
    assert reason in refused.reason, str(refused)
    assert len(str(refused)) < 400  # short enough for a status message


def test_the_good_config_is_accepted(qkvo: tuple[dict[str, Any], bytes]) -> None:
    """The control: without it, refusing everything would pass the cases above."""
    config, weights = qkvo
    adapter = canonicalize("x", json.dumps(config), weights, TINY, max_rank=16)
    assert adapter.target_modules == tuple(sorted(QKVO))
    inert = {
        "lora_dropout": 0.1,
        "task_type": "CAUSAL_LM",
        "init_lora_weights": "gaussian",
        "modules_to_save": None,
        "use_dora": False,
        "megatron_core": "megatron.core",
        "layers_pattern": None,
        "exclude_modules": None,
        "loftq_config": {},
    }
    again = canonicalize("x", json.dumps({**config, **inert}), weights, TINY, max_rank=16)
    assert all(torch.equal(adapter.lora_b[p], again.lora_b[p]) for p in QKVO)


def test_a_huge_hostile_key_is_named_but_cut_short(qkvo: tuple[dict[str, Any], bytes]) -> None:
    config, weights = qkvo
    refused = _refusal({**config, "rank_pattern": {"(" + "a" * 100_000: 4}}, weights)
    assert refused.key.startswith("rank_pattern.(aaaa") and refused.key.endswith("...")
    assert len(str(refused)) < 400


def test_oversized_config_is_refused_before_parsing(qkvo: tuple[dict[str, Any], bytes]) -> None:
    config, weights = qkvo
    text = json.dumps({**config, "padding": "x" * (300 << 10)})
    refused = _refusal(text, weights)
    assert refused.key == CONFIG_FILE and "over the limit" in refused.reason


def test_over_long_integer_is_refused_not_raised(qkvo: tuple[dict[str, Any], bytes]) -> None:
    """Python refuses to parse integers over 4300 digits with a plain ValueError."""
    config, weights = qkvo
    refused = _refusal(json.dumps(config)[:-1] + ', "r": ' + "9" * 5000 + "}", weights)
    assert refused.key == CONFIG_FILE and "not valid JSON" in refused.reason


def test_nesting_depth_ignores_brackets_inside_strings() -> None:
    assert nesting_depth('{"a": "[[[[[[[[[[", "b": [[1]], "c": "\\"]]]]"}') == 3
    assert nesting_depth(DEEP) == 100_000
    assert loads_bounded('{"k": "[[[[[[[[[[[[[[[[[["}', 1000, 2) == {"k": "[" * 18}


# ---- target_modules against the weights (issue: q_proj config, q/k/v/o weights) ---------------


def test_weights_of_modules_outside_target_modules_are_refused(
    qkvo: tuple[dict[str, Any], bytes],
) -> None:
    config, weights = qkvo
    refused = _refusal({**config, "target_modules": ["q_proj"]}, weights)
    assert re.fullmatch(
        r"base_model\.model\.model\.layers\.\d\.self_attn\.[kvo]_proj\.lora_[AB]\.weight",
        refused.key,
    )
    assert "not selected by target_modules" in refused.reason


PREFIX = "base_model.model.model.layers"
WEIGHT_CASES: dict[str, tuple[dict[str, torch.Tensor | None], str, str]] = {
    "layer-out-of-range": (
        {f"{PREFIX}.4.self_attn.q_proj.lora_A.weight": torch.zeros(8, 128)},
        f"{PREFIX}.4.self_attn.q_proj.lora_A.weight",
        "unexpected tensor",
    ),
    "leading-zero-layer": (
        {f"{PREFIX}.01.self_attn.q_proj.lora_A.weight": torch.zeros(8, 128)},
        f"{PREFIX}.01.self_attn.q_proj.lora_A.weight",
        "unexpected tensor",
    ),
    "mlp-name-under-self-attn": (
        {f"{PREFIX}.0.self_attn.gate_proj.lora_A.weight": torch.zeros(8, 128)},
        f"{PREFIX}.0.self_attn.gate_proj.lora_A.weight",
        "unexpected tensor",
    ),
    "not-lora": (
        {f"{PREFIX}.0.self_attn.q_proj.weight": torch.zeros(8, 128)},
        f"{PREFIX}.0.self_attn.q_proj.weight",
        "unexpected tensor",
    ),
    "lm-head-weights": (
        {"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 128)},
        "base_model.model.lm_head.lora_A.weight",
        "unexpected tensor",
    ),
    "missing-B": (
        {f"{PREFIX}.2.self_attn.o_proj.lora_B.weight": None},
        f"{PREFIX}.2.self_attn.o_proj.lora_B.weight",
        "missing",
    ),
    "int-dtype": (
        {f"{PREFIX}.1.self_attn.k_proj.lora_A.weight": torch.zeros(8, 128, dtype=torch.int32)},
        f"{PREFIX}.1.self_attn.k_proj.lora_A.weight",
        "dtype",
    ),
}


@pytest.mark.parametrize("changes, key, reason", WEIGHT_CASES.values(), ids=WEIGHT_CASES.keys())
def test_weight_refusal_names_the_tensor(
    qkvo: tuple[dict[str, Any], bytes],
    changes: dict[str, torch.Tensor | None],
    key: str,
    reason: str,
) -> None:
    config, weights = qkvo
    tensors = st_load(weights)
    for name, tensor in changes.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    refused = _refusal(config, bytes(st_save(tensors)))
    assert (refused.key, reason in refused.reason) == (key, True), str(refused)


def test_random_all_linear_adapter_is_accepted(all_linear: tuple[dict[str, Any], bytes]) -> None:
    """The control for the MLP refusals below (random_adapters writes MLP keys under .mlp.)."""
    config, weights = all_linear
    adapter = canonicalize("x", json.dumps(config), weights, TINY, max_rank=16)
    assert set(adapter.target_modules) == set(LINEAR_MODULES)
    assert adapter.lora_a["down_proj"].shape == (TINY.num_layers, 4, TINY.intermediate_size)


def test_mlp_weights_with_attention_shapes_are_refused(
    all_linear: tuple[dict[str, Any], bytes],
) -> None:
    config, weights = all_linear
    tensors = st_load(weights)
    key = f"{PREFIX}.3.mlp.down_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 128)  # down reads intermediate (352) features, not hidden
    refused = _refusal(config, bytes(st_save(tensors)))
    assert (refused.key, refused.reason) == (key, "shape [4, 128] != [4, 352]")


def test_mlp_targets_need_the_intermediate_size(all_linear: tuple[dict[str, Any], bytes]) -> None:
    config, weights = all_linear
    no_mlp_shape = BaseModelShape(4, 128, 4, 2, 32)  # intermediate_size unknown
    with pytest.raises(AdapterValidationError) as refused:
        canonicalize("x", json.dumps(config), weights, no_mlp_shape, max_rank=16)
    assert "intermediate_size" in str(refused.value)


# ---- safetensors headers ------------------------------------------------------------------------


def _with_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    "blob, reason",
    [
        (_with_header(DEEP.encode()), "nested 100000 deep"),
        (struct.pack("<Q", 64 << 20) + b"{" * 100, "runs past the end"),
        (_with_header(b"{" + b" " * (5 << 20) + b"}"), "over the limit"),
        (_with_header(b"[1, 2]"), "not a JSON object"),
        (_with_header(b'{"__metadata__": [1]}'), "__metadata__"),
        (_with_header(b"\xff\xfe{}"), "not UTF-8"),
    ],
    ids=["deep", "past-end", "huge", "array", "metadata-array", "not-utf8"],
)
def test_safetensors_header_is_bounded_and_nesting_safe(
    qkvo: tuple[dict[str, Any], bytes], blob: bytes, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        read_safetensors_metadata(blob)
    with pytest.raises(ValueError, match=reason):
        CanonicalAdapter.from_bytes(blob)
    refused = _refusal(qkvo[0], blob)
    assert refused.key == WEIGHTS_FILE and reason in refused.reason


def test_weights_header_reaching_past_the_file_is_refused(
    qkvo: tuple[dict[str, Any], bytes],
) -> None:
    config, weights = qkvo
    refused = _refusal(config, weights[:1000])
    assert refused.key == WEIGHTS_FILE and "not a readable safetensors file" in refused.reason
