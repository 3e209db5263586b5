"""What adapters are checked against: the linear-layer shapes of the served base model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The attention projections: the default targets of synthetic adapters and benchmarks.
TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
# Every linear layer of a Llama-family decoder layer: what a LoRA adapter may target (PEFT's
# "all-linear" for these models, which leaves out lm_head).
LINEAR_MODULES: tuple[str, ...] = TARGET_MODULES + MLP_MODULES


def module_block(proj: str) -> str:
    """The submodule of a decoder layer that holds `proj`: "self_attn" or "mlp"."""
    if proj in TARGET_MODULES:
        return "self_attn"
    if proj in MLP_MODULES:
        return "mlp"
    raise KeyError(f"{proj!r} is not a linear layer of a decoder layer")


@dataclass(frozen=True)
class BaseModelShape:
    """Layer count, attention layout and MLP width of the base model."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # 0 when unknown: then only the attention projections have dimensions.
    intermediate_size: int = 0

    def proj_dims(self, proj: str) -> tuple[int, int]:
        """(in_features, out_features) of one linear layer of a decoder layer."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        dims = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
        }
        if self.intermediate_size > 0:
            dims["gate_proj"] = (self.hidden_size, self.intermediate_size)
            dims["up_proj"] = (self.hidden_size, self.intermediate_size)
            dims["down_proj"] = (self.intermediate_size, self.hidden_size)
        elif proj in MLP_MODULES:
            raise KeyError(f"{proj}: the base model's intermediate_size is not known")
        return dims[proj]

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> BaseModelShape:
        """Read the shape from a Hugging Face `config.json` dict (Llama, Mistral, Qwen2)."""
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        return cls(
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(cfg.get("intermediate_size") or 0),
        )


# Hugging Face-style configs of the dummy (random-weight) models, by name. The store validates
# adapters against the same preset the worker builds, so both read them from here.
DUMMY_PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for a laptop CPU; byte-level vocabulary (3 specials + 256 bytes).
    "tiny": {
        "model_type": "llama",
        "vocab_size": 259,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    },
    # Llama-7B shapes, S-LoRA's benchmark setting.
    "llama-7b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    },
}


def load_hf_config(model: str) -> dict[str, Any]:
    """A dummy preset by name, or the `config.json` of a local Hugging Face folder."""
    if model in DUMMY_PRESETS:
        return dict(DUMMY_PRESETS[model])
    path = Path(model) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"model {model!r} is neither a dummy preset ({', '.join(DUMMY_PRESETS)}) "
            f"nor a folder with config.json"
        )
    loaded = json.loads(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} is not a JSON object")
    return loaded
