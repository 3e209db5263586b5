"""The fused projections (q|k|v as `qkv_proj`, gate|up as `gate_up_proj`) against Hugging
Face's separate nn.Linear layers, on random weights loaded from an HF checkpoint by name.

The oracle is HF's `LlamaForCausalLM` itself: each of its q/k/v/gate/up layers applied to the
same input must give what our fused layer's column views give. GQA (kv width != q width) with
q/k/v biases, so that a part copied into another's rows, or a bias into the wrong range, shows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.gpu_worker.model.model import FusedLinear
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model, hf_state_dict, load_hf_model
from tests.oracle import TINY_GQA

GQA_BIAS = {**TINY_GQA, "attention_bias": True}


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory: pytest.TempPathFactory):
    folder: Path = tmp_path_factory.mktemp("gqa-bias")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**GQA_BIAS)).eval()
    with torch.no_grad():  # HF zeroes biases at init; make every weight and bias count
        for param in hf.parameters():
            param.normal_(0, 0.05)
    hf.save_pretrained(folder)
    ours = load_hf_model(folder, ModelConfig.from_hf(GQA_BIAS), torch.float32, torch.device("cpu"))
    return hf, ours


@torch.no_grad()
def test_fused_outputs_match_separate_hf_linears(hf_and_ours):
    hf, ours = hf_and_ours
    x = torch.randn(7, GQA_BIAS["hidden_size"], generator=torch.Generator().manual_seed(1))
    for theirs, mine in zip(hf.model.layers, ours.model.layers, strict=True):
        attn = theirs.self_attn
        qkv_proj = mine.self_attn.qkv_proj
        q, k, v = qkv_proj.split(qkv_proj(x))
        assert q.shape[1] != k.shape[1]  # GQA: a shifted row range cannot line up by chance
        for got, linear in ((q, attn.q_proj), (k, attn.k_proj), (v, attn.v_proj)):
            assert linear.bias is not None and bool(linear.bias.abs().sum() > 0)
            torch.testing.assert_close(got, linear(x), atol=1e-6, rtol=1e-6)
        gate, up = mine.mlp.gate_up_proj.split(mine.mlp.gate_up_proj(x))
        torch.testing.assert_close(gate, theirs.mlp.gate_proj(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(up, theirs.mlp.up_proj(x), atol=1e-6, rtol=1e-6)


def test_hf_state_dict_gives_back_the_checkpoint(hf_and_ours):
    """What the oracle tests load into HF (`hf_state_dict`) is the checkpoint, name for name."""
    hf, ours = hf_and_ours
    expected = hf.state_dict()
    got = hf_state_dict(ours)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_split_outputs_are_views_of_one_gemm():
    """The parts are column views of one output (LoRA adds into it in place, before the
    split)."""
    fused = FusedLinear(8, (("a", 3), ("b", 5)), bias=True)
    a, b = fused.split(fused(torch.randn(4, 8)))
    assert a.data_ptr() + 3 * a.element_size() == b.data_ptr()
    assert a.stride() == b.stride() == (8, 1)


def _unfused_order(num_layers: int, bias: bool) -> list[str]:
    """The order in which our model's parameters came before fusing (module order: each
    layer's input norm, q, k, v, o (with biases: HF's attention_bias), post-attention norm,
    gate, up, down)."""
    names = ["model.embed_tokens.weight"]
    for i in range(num_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        names.append(f"model.layers.{i}.input_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names += [f"{attn}.{proj}.weight"] + ([f"{attn}.{proj}.bias"] if bias else [])
        names.append(f"model.layers.{i}.post_attention_layernorm.weight")
        names += [f"{mlp}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
    return [*names, "model.norm.weight", "lm_head.weight"]


def test_dummy_weights_are_drawn_as_before_fusing():
    """A dummy build draws one tensor per HF name in the unfused module order: fusing changes
    no weight (the same seed gives the model it gave with separate layers)."""
    config = ModelConfig.from_hf(GQA_BIAS)
    model = build_dummy_model(config, 5, torch.float32, torch.device("cpu"))
    shapes = {k: v.shape for k, v in LlamaForCausalLM(LlamaConfig(**GQA_BIAS)).state_dict().items()}
    order = _unfused_order(config.num_layers, bias=True)
    assert set(order) == set(shapes)
    gen = torch.Generator().manual_seed(5)
    got = hf_state_dict(model)
    for name in order:
        noise = torch.randn(shapes[name], generator=gen)
        expected = 1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.02 * noise
        assert torch.equal(got[name], expected), name
