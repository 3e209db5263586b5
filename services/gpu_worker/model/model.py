"""Llama-architecture decoder (Llama 1/2/3, Mistral, Qwen2) over a flat batch of tokens.

Parameter names follow Hugging Face's `LlamaForCausalLM`, except that the projections of one
input run as one GEMM: q, k and v as `qkv_proj`, gate and up as `gate_up_proj` (`FusedLinear`,
its rows the parts' rows in that order; LoRA adds into each part's column view of the fused
output). `FusedLinear.hf_tensors` names each part's rows as HF does, so a checkpoint still
loads by name (weights.py: `hf_parameters`). Attention and the elementwise ops go through the
model's `ModelBackends` (chosen when it is built), LoRA through the batch's `lora_backend`
(chosen by the engine). LoRA may target any of the seven linear layers of a decoder layer (q,
k, v, o, gate, up, down).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.memory.adapter_tables import DOWN, GATE_UP, O_PROJ, QKV
from services.gpu_worker.model.backends import ModelBackends
from services.gpu_worker.model.fused_ops import ElementwiseOps
from services.gpu_worker.model.model_config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: ElementwiseOps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 and scale in the input dtype, as Hugging Face does.
        return self.ops.rms_norm(x, self.weight, self.eps)


class FusedLinear(nn.Linear):
    """Several projections of one input as one GEMM: their weights stacked by rows in the
    order of `parts` ((Hugging Face name, out_features) each). `split` gives each part's
    output as a column view of the fused output (row stride: the fused width)."""

    def __init__(self, in_features: int, parts: tuple[tuple[str, int], ...], bias: bool):
        super().__init__(in_features, sum(size for _, size in parts), bias=bias)
        self.parts = parts
        self.sizes = [size for _, size in parts]

    def split(self, fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each part's columns of this layer's output `fused`, as views."""
        return fused.split(self.sizes, dim=-1)

    def hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(`"<part>.weight"` or `"<part>.bias"`, the part's rows as a view sharing storage) in
        Hugging Face's order: each part's weight, then its bias."""
        start = 0
        for name, size in self.parts:
            yield f"{name}.weight", self.weight.detach()[start : start + size]
            if self.bias is not None:
                yield f"{name}.bias", self.bias.detach()[start : start + size]
            start += size


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with Llama-3 frequency scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scale = config.rope_llama3
    if not scale:
        return inv_freq
    old_len = scale["original_max_position_embeddings"]
    low_wavelen = old_len / scale["low_freq_factor"]
    high_wavelen = old_len / scale["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scale["factor"], inv_freq)
    smooth = (old_len / wavelen - scale["low_freq_factor"]) / (
        scale["high_freq_factor"] - scale["low_freq_factor"]
    )
    blended = (1 - smooth) * scaled / scale["factor"] + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, backends: ModelBackends):
        super().__init__()
        self.layer = layer
        self.attention, self.ops = backends.attention, backends.elementwise
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        hidden, q_dim = config.hidden_size, config.num_heads * config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        parts = (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim))
        self.qkv_proj = FusedLinear(hidden, parts, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=config.o_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        tokens, layer = x.shape[0], self.layer
        qkv = self.qkv_proj(x)
        lora = batch.lora_backend
        if batch.max_rank:
            lora.apply(x, qkv, batch, layer, QKV, self.qkv_proj.sizes)
        q, k, v = self.qkv_proj.split(qkv)
        q = self.ops.rotary(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = self.ops.rotary(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        attn = self.attention.attend(layer, q, k, v, batch).reshape(tokens, -1)
        out = self.o_proj(attn)
        if batch.max_rank:
            lora.apply(attn, out, batch, layer, O_PROJ, (out.shape[1],))
        return out


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, ops: ElementwiseOps):
        super().__init__()
        self.layer = layer
        self.ops = ops
        parts = (("gate_proj", config.intermediate_size), ("up_proj", config.intermediate_size))
        self.gate_up_proj = FusedLinear(config.hidden_size, parts, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        # Batches whose adapters all leave the MLP alone skip its LoRA launches altogether.
        with_lora = batch.max_rank > 0 and batch.mlp_lora
        lora = batch.lora_backend
        if with_lora:
            lora.apply(x, gate_up, batch, self.layer, GATE_UP, self.gate_up_proj.sizes)
        hidden = self.ops.silu_mul(*self.gate_up_proj.split(gate_up))
        out = self.down_proj(hidden)
        if with_lora:
            lora.apply(hidden, out, batch, self.layer, DOWN, (out.shape[1],))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, backends: ModelBackends):
        super().__init__()
        ops = backends.elementwise
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = Attention(config, layer, backends)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = MLP(config, layer, ops)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch)
        return x + self.mlp(self.post_attention_layernorm(x), batch)


class LlamaModel(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig, backends: ModelBackends):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, backends) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backends.elementwise)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        freqs = batch.positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, batch)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backends: ModelBackends | None = None):
        """`backends`: how attention and the elementwise ops run; the torch references unless
        given (the builders in weights.py choose them for the model's device)."""
        super().__init__()
        self.config = config
        self.backends = backends or ModelBackends.reference()
        self.model = LlamaModel(config, self.backends)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (again after
        `to_empty`, which gives every parameter its own storage)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self) -> None:
        """Recompute RoPE frequencies in float32 on the model's device. Needed after a dtype
        cast (which would round them) or a meta-device build (which leaves them empty)."""
        device = self.lm_head.weight.device
        self.model.inv_freq = rope_inv_freq(self.config).to(device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [B, vocab] at `batch.logits_rows`."""
        hidden = self.model(batch)
        return self.lm_head(hidden.index_select(0, batch.logits_rows)).float()
