"""PEFT adapters on any of the seven linear layers, with per-module ranks and scalings, convert
to canonical tensors whose delta B@A is PEFT's own, module by module, without rank padding.

The oracle is PEFT itself: the model is loaded from the saved folder with
`PeftModel.from_pretrained`, and each LoRA module's delta is `merged weight - base weight`
(PEFT's `get_delta_weight`, which applies its own scaling)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from transformers import LlamaConfig, LlamaForCausalLM

from services.common.base_model import LINEAR_MODULES, BaseModelShape, module_block
from services.common.peft_adapter import CONFIG_FILE, WEIGHTS_FILE, load_peft_folder

# Small, but every dimension distinct so that a swapped in/out or gate/down shows.
LLAMA: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
SHAPE = BaseModelShape.from_hf_config(LLAMA)

CASES: dict[str, dict[str, Any]] = {
    "all-linear": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    "mlp-only": {"r": 6, "lora_alpha": 3, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "mixed-ranks-alpha-pattern": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj", "down_proj", "up_proj"],
        "rank_pattern": {"down_proj": 2, "model.layers.1.self_attn.q_proj": 16, "v_proj": 4},
        "alpha_pattern": {"layers.2.mlp.up_proj": 5, "q_proj": 40},
    },
    "rslora-mixed": {
        "r": 16,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": "all-linear",
        "rank_pattern": {"mlp.gate_proj": 2, "layers.0.self_attn.k_proj": 12},
        "alpha_pattern": {"o_proj": 2},
    },
    "some-layers": {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["k_proj", "gate_proj"],
        "layers_to_transform": [0, 2],
        "layers_pattern": "layers",
    },
}


def _save_peft(folder: Path, lora: dict[str, Any], seed: int = 0) -> LlamaForCausalLM:
    """Save a random PEFT adapter; the base model it was made on."""
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(str(folder))
    return base


def _peft_deltas(base: LlamaForCausalLM, folder: Path) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, proj): W_merged - W_base} from PEFT loading the saved folder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    deltas = {}
    for name, module in loaded.named_modules():
        if isinstance(module, LoraLinear):
            parts = name.split(".")
            layer, proj = int(parts[parts.index("layers") + 1]), parts[-1]
            deltas[(layer, proj)] = module.get_delta_weight("default").detach().float()
    return deltas


@pytest.mark.parametrize("lora", CASES.values(), ids=CASES.keys())
def test_canonical_delta_equals_peft_delta_per_layer_and_module(
    tmp_path: Path, lora: dict[str, Any]
) -> None:
    base = _save_peft(tmp_path, lora)
    expected = _peft_deltas(base, tmp_path)
    adapter = load_peft_folder(tmp_path, SHAPE, max_rank=64)

    assert set(adapter.target_modules) == {proj for _, proj in expected}
    checked = 0
    for proj in adapter.target_modules:
        for layer in range(SHAPE.num_layers):
            ours = adapter.lora_b[proj][layer].float() @ adapter.lora_a[proj][layer].float()
            want = expected.get((layer, proj), torch.zeros_like(ours))
            torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
            checked += int((layer, proj) in expected)
    assert checked == len(expected) > 0


DROP = object()
# The config file edited after saving, and PEFT loading it as edited: (r, edits).
CONFIG_EDITS: dict[str, tuple[int, dict[str, Any]]] = {
    # PEFT's LoraConfig defaults (r=8, lora_alpha=8) apply; r=4 so that a default of r differs.
    "no-lora-alpha": (4, {"lora_alpha": DROP}),
    "no-r": (8, {"r": DROP}),
    # PEFT resets it for nn.Linear targets (with a warning): the weights are not transposed.
    "fan-in-fan-out": (4, {"fan_in_fan_out": True}),
    "training-only-options": (
        4,
        {"lora_dropout": 0.5, "init_lora_weights": "gaussian", "inference_mode": False},
    ),
    "all-linear-written-as-list": (4, {"target_modules": sorted(LINEAR_MODULES)}),
}


@pytest.mark.parametrize("rank, edits", CONFIG_EDITS.values(), ids=CONFIG_EDITS.keys())
def test_edited_config_converts_as_peft_loads_it(
    tmp_path: Path, rank: int, edits: dict[str, Any]
) -> None:
    lora = {"r": rank, "lora_alpha": 32, "target_modules": "all-linear"}
    base = _save_peft(tmp_path, lora)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    for key, value in edits.items():
        if value is DROP:
            del config[key]
        else:
            config[key] = value
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    expected = _peft_deltas(base, tmp_path)
    adapter = load_peft_folder(tmp_path, SHAPE, max_rank=64)
    assert len(expected) == SHAPE.num_layers * len(LINEAR_MODULES)
    for (layer, proj), want in expected.items():
        ours = adapter.lora_b[proj][layer].float() @ adapter.lora_a[proj][layer].float()
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def test_each_projection_keeps_its_own_rank(tmp_path: Path) -> None:
    lora = CASES["mixed-ranks-alpha-pattern"]
    _save_peft(tmp_path, lora)
    adapter = load_peft_folder(tmp_path, SHAPE, max_rank=64)
    # q_proj: 8 in two layers, 16 in layer 1 -> 16; v_proj 4; down_proj 2; up_proj 8.
    ranks = {p: adapter.lora_a[p].shape[1] for p in adapter.target_modules}
    assert ranks == {"q_proj": 16, "v_proj": 4, "down_proj": 2, "up_proj": 8}
    assert {p: adapter.lora_b[p].shape[2] for p in adapter.target_modules} == ranks
    assert adapter.rank == 16
    for proj in adapter.target_modules:
        in_f, out_f = SHAPE.proj_dims(proj)
        assert adapter.lora_a[proj].shape == (SHAPE.num_layers, ranks[proj], in_f)
        assert adapter.lora_b[proj].shape == (SHAPE.num_layers, out_f, ranks[proj])


def test_mixed_rank_blob_is_about_the_peft_file_size(tmp_path: Path) -> None:
    """One large-rank projection must not inflate the others: padding every module to rank 32
    would make the blob about 5x the PEFT file."""
    lora = {"r": 2, "lora_alpha": 8, "target_modules": "all-linear", "rank_pattern": {"q_proj": 32}}
    _save_peft(tmp_path, lora)
    adapter = load_peft_folder(tmp_path, SHAPE, max_rank=64)
    peft_bytes = (tmp_path / WEIGHTS_FILE).stat().st_size
    blob = adapter.to_bytes()
    # Same numbers in both (fp32), fewer tensors in ours: only the headers differ.
    assert peft_bytes - 16384 < len(blob) <= peft_bytes
    assert adapter.rank == 32
    assert {p: adapter.lora_a[p].shape[1] for p in LINEAR_MODULES} == {
        p: 32 if p == "q_proj" else 2 for p in LINEAR_MODULES
    }


def test_mlp_weights_have_mlp_shapes(tmp_path: Path) -> None:
    """gate/up read hidden -> intermediate, down intermediate -> hidden; the PEFT file agrees."""
    _save_peft(tmp_path, CASES["mlp-only"])
    adapter = load_peft_folder(tmp_path, SHAPE, max_rank=64)
    hidden, inter = LLAMA["hidden_size"], LLAMA["intermediate_size"]
    assert adapter.lora_a["gate_proj"].shape[2] == adapter.lora_a["up_proj"].shape[2] == hidden
    assert adapter.lora_b["gate_proj"].shape[1] == adapter.lora_b["up_proj"].shape[1] == inter
    assert (adapter.lora_a["down_proj"].shape[2], adapter.lora_b["down_proj"].shape[1]) == (
        inter,
        hidden,
    )
    assert module_block("down_proj") == "mlp" and module_block("o_proj") == "self_attn"
    assert (tmp_path / CONFIG_FILE).is_file()
