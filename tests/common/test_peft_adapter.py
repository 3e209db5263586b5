"""`canonicalize` and `load_peft_folder` on small hand-made PEFT adapters: the canonical
tensors against LoRA's definition (delta = scaling * B @ A, scaling = alpha / r, or
alpha / sqrt(r) with rsLoRA, per module under rank_pattern / alpha_pattern), the zero padding,
the half-precision fold, and each refusal's key and message. (test_peft_conversion.py checks
the same against PEFT itself, on fewer and slower cases.)"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from services.common.base_model import BaseModelShape
from services.common.peft_adapter import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterValidationError,
    canonicalize,
    load_peft_folder,
)
from services.common.peft_config import MAX_CONFIG_BYTES

# q/o: 4 -> 4, k/v: 4 -> 2, gate/up: 4 -> 6, down: 6 -> 4.
SHAPE = BaseModelShape(
    num_layers=2, hidden_size=4, num_heads=2, num_kv_heads=1, head_dim=2, intermediate_size=6
)
DIMS = {"q_proj": (4, 4), "k_proj": (4, 2), "v_proj": (4, 2), "down_proj": (6, 4)}
BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}


def _key(layer: int, proj: str, kind: str) -> str:
    return f"base_model.model.model.layers.{layer}.{BLOCK[proj]}.{proj}.lora_{kind}.weight"


def _weights(
    ranks: dict[tuple[int, str], int], dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for (layer, proj), rank in ranks.items():
        in_f, out_f = DIMS[proj]
        tensors[_key(layer, proj, "A")] = torch.randn(rank, in_f, generator=gen).to(dtype)
        tensors[_key(layer, proj, "B")] = torch.randn(out_f, rank, generator=gen).to(dtype)
    return tensors


def _convert(config: dict[str, Any], tensors: dict[str, torch.Tensor], max_rank: int = 64):
    return canonicalize("ad", json.dumps(config), bytes(st_save(tensors)), SHAPE, max_rank)


def _refusal(config: dict[str, Any], tensors: dict[str, torch.Tensor], max_rank: int = 64):
    with pytest.raises(AdapterValidationError) as refused:
        _convert(config, tensors, max_rank)
    return refused.value


def _assert_module(adapter, tensors, layer: int, proj: str, scaling: float) -> None:
    """Layer `layer` of `proj` holds this module's delta, and zeros past its own rank."""
    a, b = tensors[_key(layer, proj, "A")].float(), tensors[_key(layer, proj, "B")].float()
    rank = a.shape[0]
    ours_a, ours_b = adapter.lora_a[proj][layer].float(), adapter.lora_b[proj][layer].float()
    torch.testing.assert_close(ours_b @ ours_a, scaling * (b @ a), rtol=1e-6, atol=1e-6)
    assert torch.equal(ours_a[:rank], a)  # A is never scaled
    assert not ours_a[rank:].any() and not ours_b[:, rank:].any()


def test_modules_keep_their_own_rank_and_scaling_with_zero_padding():
    ranks = {(0, "q_proj"): 2, (1, "q_proj"): 3, (0, "down_proj"): 2, (1, "down_proj"): 2}
    tensors = _weights(ranks)
    config = {
        "r": 2,
        "lora_alpha": 6,
        "target_modules": ["q_proj", "down_proj"],
        "rank_pattern": {"layers.1.self_attn.q_proj": 3},
        "alpha_pattern": {"down_proj": 5},
        "base_model_name_or_path": "tiny-base",
    }
    adapter = _convert(config, tensors)
    assert {p: t.shape for p, t in adapter.lora_a.items()} == {
        "q_proj": (2, 3, 4),  # the largest rank of q_proj over the layers
        "down_proj": (2, 2, 6),
    }
    assert {p: t.shape for p, t in adapter.lora_b.items()} == {
        "q_proj": (2, 4, 3),
        "down_proj": (2, 4, 2),
    }
    # Per module: alpha / its own rank (a rank_pattern rank, not the top-level r).
    _assert_module(adapter, tensors, 0, "q_proj", 6 / 2)
    _assert_module(adapter, tensors, 1, "q_proj", 6 / 3)
    _assert_module(adapter, tensors, 0, "down_proj", 5 / 2)
    _assert_module(adapter, tensors, 1, "down_proj", 5 / 2)
    top = (adapter.adapter_id, adapter.rank, adapter.alpha, adapter.scaling, adapter.base_model)
    assert top == ("ad", 3, 6.0, 3.0, "tiny-base")
    assert adapter.lora_a["q_proj"].dtype == torch.float32


def test_rslora_scales_by_the_square_root_of_each_modules_rank():
    ranks = {(0, "k_proj"): 4, (1, "k_proj"): 4, (0, "v_proj"): 9, (1, "v_proj"): 9}
    tensors = _weights(ranks, seed=1)
    config = {
        "r": 4,
        "lora_alpha": 3,
        "use_rslora": True,
        "target_modules": ["k_proj", "v_proj"],
        "rank_pattern": {"v_proj": 9},
        "alpha_pattern": {"layers.1.self_attn.k_proj": 10},
    }
    adapter = _convert(config, tensors)
    _assert_module(adapter, tensors, 0, "k_proj", 3 / math.sqrt(4))
    _assert_module(adapter, tensors, 1, "k_proj", 10 / math.sqrt(4))
    _assert_module(adapter, tensors, 0, "v_proj", 3 / math.sqrt(9))
    _assert_module(adapter, tensors, 1, "v_proj", 3 / math.sqrt(9))
    assert (adapter.rank, adapter.scaling) == (9, 3 / math.sqrt(4))


def test_untouched_layers_are_zero():
    tensors = _weights({(1, "q_proj"): 2})
    config = {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], "layers_to_transform": [1]}
    adapter = _convert(config, tensors)
    assert not adapter.lora_a["q_proj"][0].any() and not adapter.lora_b["q_proj"][0].any()
    _assert_module(adapter, tensors, 1, "q_proj", 1.0)


def test_half_precision_b_is_scaled_in_float32_and_rounded_once():
    tensors = _weights({(0, "q_proj"): 2, (1, "q_proj"): 2}, dtype=torch.float16, seed=3)
    config = {"r": 2, "lora_alpha": 2 / 3, "target_modules": ["q_proj"]}
    adapter = _convert(config, tensors)
    scaling = (2 / 3) / 2
    for layer in (0, 1):
        b = tensors[_key(layer, "q_proj", "B")]
        once = (b.float() * scaling).half()
        twice = b * torch.tensor(scaling, dtype=torch.float16)  # scaled in half precision
        assert not torch.equal(once, twice)  # the two roundings differ on these values
        assert torch.equal(adapter.lora_b["q_proj"][layer], once)
    assert adapter.lora_a["q_proj"].dtype == adapter.lora_b["q_proj"].dtype == torch.float16


@pytest.mark.parametrize(
    ("patterns", "key"), [({}, "lora_alpha"), ({"alpha_pattern": {"k_proj": 1}}, "alpha_pattern")]
)
def test_a_scaling_that_overflows_the_dtype_is_refused(patterns, key):
    tensors = _weights({(0, "q_proj"): 1, (1, "q_proj"): 1}, dtype=torch.float16)
    tensors[_key(1, "q_proj", "B")] = torch.full((4, 1), 100.0, dtype=torch.float16)
    config = {"r": 1, "lora_alpha": 1000.0, "target_modules": ["q_proj"], **patterns}
    refused = _refusal(config, tensors)
    assert refused.key == key
    assert refused.reason == (
        "scaling 1000.0 of model.layers.1.self_attn.q_proj overflows torch.float16 once folded "
        "into lora_B"
    )


def test_the_rank_limit_is_inclusive():
    tensors = _weights({(0, "q_proj"): 3, (1, "q_proj"): 3})
    config = {"r": 3, "lora_alpha": 3, "target_modules": ["q_proj"]}
    assert _convert(config, tensors, max_rank=3).rank == 3
    refused = _refusal(config, tensors, max_rank=2)
    assert (refused.key, refused.reason) == (_key(0, "q_proj", "A"), "rank 3 > max rank 2")


@pytest.mark.parametrize(
    ("kind", "shape", "reason"),
    [("A", (2, 5), "shape [2, 5] != [2, 4]"), ("B", (4, 3), "shape [4, 3] != [4, 2]")],
)
def test_a_tensor_of_the_wrong_shape_is_refused(kind, shape, reason):
    tensors = _weights({(0, "q_proj"): 2, (1, "q_proj"): 2})
    tensors[_key(1, "q_proj", kind)] = torch.zeros(shape)
    refused = _refusal({"r": 2, "target_modules": ["q_proj"]}, tensors)
    assert (refused.key, refused.reason) == (_key(1, "q_proj", kind), reason)


def test_tensor_names_are_checked_against_the_selection():
    config = {"r": 2, "target_modules": ["q_proj"], "layers_to_transform": [0]}
    tensors = _weights({(0, "q_proj"): 2, (1, "q_proj"): 2})
    refused = _refusal(config, tensors)
    assert (refused.key, refused.reason) == (
        _key(1, "q_proj", "A"),
        "its module is not selected by target_modules (PEFT would not load it); fix "
        "target_modules or remove the tensor",
    )
    tensors = _weights({(0, "q_proj"): 2})
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weightx"] = torch.zeros(1)
    refused = _refusal(config, tensors)
    assert refused.key == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weightx"
    assert refused.reason == (
        "unexpected tensor; only lora_A/lora_B weights of the base model's "
        "q_proj/k_proj/v_proj/o_proj/gate_proj/up_proj/down_proj layers (0..1) are allowed"
    )
    tensors = _weights({(0, "q_proj"): 2})
    del tensors[_key(0, "q_proj", "A")]
    refused = _refusal(config, tensors)
    assert (refused.key, refused.reason) == (
        _key(0, "q_proj", "A"),
        "missing (target_modules selects this module)",
    )


def test_names_without_the_peft_prefix_are_refused():
    tensors = {
        k.removeprefix("base_model.model."): v for k, v in _weights({(0, "q_proj"): 2}).items()
    }
    refused = _refusal({"r": 2, "target_modules": ["q_proj"], "layers_to_transform": [0]}, tensors)
    assert refused.key == "model.layers.0.self_attn.q_proj.lora_A.weight"


def test_non_finite_weights_are_refused_by_name():
    tensors = _weights({(0, "q_proj"): 2, (1, "q_proj"): 2})
    tensors[_key(1, "q_proj", "B")][2, 1] = float("inf")
    refused = _refusal({"r": 2, "target_modules": ["q_proj"]}, tensors)
    assert (refused.key, refused.reason) == (
        _key(1, "q_proj", "B"),
        "has non-finite values (NaN or inf)",
    )


def test_unreadable_weights_are_refused_as_the_file():
    config = json.dumps({"r": 2, "target_modules": ["q_proj"]})
    blob = bytes(st_save(_weights({(0, "q_proj"): 2, (1, "q_proj"): 2})))
    for broken in (b"\x00" * 4, blob[:-8]):  # no header; a header whose data is cut short
        with pytest.raises(AdapterValidationError) as refused:
            canonicalize("ad", config, broken, SHAPE, 64)
        assert refused.value.key == WEIGHTS_FILE
        assert refused.value.reason.startswith("not a readable safetensors file (")


# ---- load_peft_folder ---------------------------------------------------------------------


def _folder(path: Path, config_text: str) -> Path:
    path.mkdir()
    (path / CONFIG_FILE).write_text(config_text)
    (path / WEIGHTS_FILE).write_bytes(bytes(st_save(_weights({(0, "q_proj"): 2}))))
    return path


def test_a_folder_loads_under_its_name_or_the_id_given(tmp_path: Path):
    config = json.dumps({"r": 2, "target_modules": ["q_proj"], "layers_to_transform": [0]})
    folder = _folder(tmp_path / "my-adapter", config)
    assert load_peft_folder(folder, SHAPE, 64).adapter_id == "my-adapter"
    assert load_peft_folder(str(folder), SHAPE, 64, adapter_id="other").adapter_id == "other"


def test_config_size_limit_is_inclusive(tmp_path: Path):
    config = json.dumps({"r": 2, "target_modules": ["q_proj"], "layers_to_transform": [0]})
    fits = _folder(tmp_path / "fits", config + " " * (MAX_CONFIG_BYTES - len(config)))
    assert load_peft_folder(fits, SHAPE, 64).rank == 2
    over = _folder(tmp_path / "over", config + " " * (MAX_CONFIG_BYTES + 1 - len(config)))
    with pytest.raises(AdapterValidationError) as refused:
        load_peft_folder(over, SHAPE, 64)
    assert (refused.value.key, refused.value.reason) == (
        CONFIG_FILE,
        f"over the limit of {MAX_CONFIG_BYTES} bytes",
    )


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_a_missing_file_is_named(tmp_path: Path, missing: str):
    folder = _folder(tmp_path / "a", json.dumps({"r": 2, "target_modules": ["q_proj"]}))
    (folder / missing).unlink()
    with pytest.raises(AdapterValidationError) as refused:
        load_peft_folder(folder, SHAPE, 64)
    assert (refused.value.key, refused.value.reason) == (missing, f"missing in {folder}")
