"""Random LoRA adapters written as real PEFT folders: for demos and benchmarks (S-LoRA's
setting of many synthetic adapters). Tests make theirs with the `peft` library instead."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.common.base_model import TARGET_MODULES, BaseModelShape, module_block


def save_random_peft_adapter(
    folder: str | Path,
    shape: BaseModelShape,
    rank: int,
    seed: int,
    alpha: float | None = None,
    targets: Sequence[str] = TARGET_MODULES,
    std: float = 0.05,
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors with random A and B on `targets`
    (any of base_model.LINEAR_MODULES; the MLP ones need the shape's intermediate_size)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(shape.num_layers):
        for proj in targets:
            in_f, out_f = shape.proj_dims(proj)
            prefix = f"base_model.model.model.layers.{layer}.{module_block(proj)}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = std * torch.randn(rank, in_f, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = std * torch.randn(out_f, rank, generator=generator)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "target_modules": list(targets),
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "base_model_name_or_path": "",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
