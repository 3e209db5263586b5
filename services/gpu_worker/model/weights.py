"""Build the model: from a local Hugging Face folder, or with seeded random weights (--dummy)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from services.gpu_worker.model.backends import ModelBackends
from services.gpu_worker.model.model import FusedLinear, LlamaForCausalLM
from services.gpu_worker.model.model_config import ModelConfig

logger = logging.getLogger(__name__)

# Checkpoint tensors that carry no weights of ours (recomputed buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_parameters(
    model: LlamaForCausalLM, remove_duplicate: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of `model` under its Hugging Face name, in HF's order, as a tensor that
    shares its storage (writing into it writes the model): a fused projection's parameter is
    given as each part's rows (`model.layers.0.self_attn.k_proj.weight`). With
    `remove_duplicate`, a tied output head appears once, as the embedding."""
    fused = {name: m for name, m in model.named_modules() if isinstance(m, FusedLinear)}
    for name, param in model.named_parameters(remove_duplicate=remove_duplicate):
        owner, _, kind = name.rpartition(".")
        module = fused.get(owner)
        if module is None:
            yield name, param.detach()
        elif kind == "weight":  # its parts' weights and biases; the fused bias is skipped
            parent = owner.rpartition(".")[0]
            for suffix, part in module.hf_tensors():
                yield f"{parent}.{suffix}", part


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The state dict Hugging Face's `LlamaForCausalLM` loads (`load_state_dict`): the same
    weights under HF's names, views into `model`'s storage."""
    return dict(hf_parameters(model, remove_duplicate=False))


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def load_hf_model(
    folder: str | Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    backends: ModelBackends | None = None,
) -> LlamaForCausalLM:
    """Load (sharded or single-file) safetensors weights, tensor by tensor, onto `device`.
    `backends`: those of `device` unless given."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, backends or ModelBackends.for_device(device))
    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()
    params = dict(hf_parameters(model))
    loaded: set[str] = set()
    for path in _checkpoint_files(Path(folder)):
        with safe_open(str(path), framework="pt", device="cpu") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in params:
                    raise ValueError(f"{path.name}: unexpected tensor {name}")
                tensor = shard.get_tensor(name)
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(
                        f"{name}: shape {list(tensor.shape)} != {list(params[name].shape)}"
                    )
                with torch.no_grad():
                    params[name].copy_(tensor)
                loaded.add(name)
    if config.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint misses {len(missing)} tensors, e.g. {missing[:3]}")
    model.reset_rope()
    logger.info("loaded %d tensors from %s", len(loaded), folder)
    return model.eval()


def build_dummy_model(
    config: ModelConfig,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    std: float = 0.02,
    draw_on_device: bool = False,
    backends: ModelBackends | None = None,
) -> LlamaForCausalLM:
    """Random weights from `seed` (S-LoRA's benchmark setting): the same seed, the same model.

    By default weights are drawn on the CPU in float32, so the model is the same on every
    device (tests compare against a CPU oracle). `draw_on_device` draws them on `device`
    instead: much faster for 7B-sized models, but only reproducible on that kind of device.
    `backends`: those of `device` unless given.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(config, backends or ModelBackends.for_device(device))
    model.to_empty(device=device)
    model.to(dtype)
    model.tie_weights()
    gen_device = device if draw_on_device else torch.device("cpu")
    generator = torch.Generator(gen_device).manual_seed(seed)
    with torch.no_grad():
        # By HF names, one draw per HF tensor: a fused projection gets the draws its parts
        # would get unfused.
        for name, param in hf_parameters(model):
            noise = torch.randn(param.shape, generator=generator, device=gen_device)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(std * noise)
    model.reset_rope()
    return model.eval()
