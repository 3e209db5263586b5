"""Loading a Hugging Face folder written by `save_pretrained` gives HF's logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from services.common.base_model import load_hf_config
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.engine.tokenizer import ByteTokenizer, HFTokenizer
from services.gpu_worker.model.model import LlamaForCausalLM as OurLlama
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import load_hf_model
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.server import build_worker_engine
from tests.oracle import TINY_GQA, TINY_MHA

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "mha": TINY_MHA,
    "gqa-llama3-rope": {**TINY_GQA, "rope_parameters": LLAMA3_ROPE},
    "tied-embeddings": {**TINY_MHA, "tie_word_embeddings": True},
    "qkv-bias": {**TINY_MHA, "attention_bias": True},
}


def _all_logits(model: OurLlama, ids: list[int]) -> torch.Tensor:
    """Our logits at every position of one prefill through the engine's paged batch."""
    engine = Engine(model, EngineConfig(pool_slots=4 * len(ids)))
    engine.add(Sequence("all", ids, SamplingOptions(max_new_tokens=1), ByteTokenizer(), print))
    batch = engine.build_batch(engine.scheduler.schedule().prefill)
    batch.logits_rows = torch.arange(len(ids))
    return model(batch)


@pytest.mark.parametrize("hf_config", VARIANTS.values(), ids=VARIANTS.keys())
def test_saved_hf_folder_loads_to_the_same_logits(hf_config: dict[str, Any], tmp_path: Path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config)).eval()
    with torch.no_grad():  # HF initializes some weights to zero or one; make every one count
        for param in hf.parameters():
            param.normal_(0, 0.05)
    hf.save_pretrained(tmp_path, max_shard_size="200KB")  # several shards and an index
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ours = load_hf_model(
        tmp_path,
        ModelConfig.from_hf(load_hf_config(str(tmp_path))),
        torch.float32,
        torch.device("cpu"),
    )
    ids = torch.randint(0, hf_config["vocab_size"], (90,)).tolist()  # past the llama3 knee
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_all_logits(ours, ids), expected, atol=1e-4, rtol=1e-4)


def test_missing_tensor_is_refused_with_its_name(tmp_path: Path):
    hf = LlamaForCausalLM(LlamaConfig(**TINY_MHA))
    state = {k: v for k, v in hf.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    hf.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj"):
        load_hf_model(tmp_path, ModelConfig.from_hf(TINY_MHA), torch.float32, torch.device("cpu"))


def test_worker_serves_a_local_folder_with_its_tokenizer(tmp_path: Path):
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]", "<s>", "</s>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    LlamaForCausalLM(LlamaConfig(**{**TINY_MHA, "vocab_size": 259})).save_pretrained(tmp_path)

    engine, tokenizer = build_worker_engine(
        WorkerConfig(model=str(tmp_path), dummy=False, device="cpu")
    )
    assert isinstance(tokenizer, HFTokenizer)
    ids = tokenizer.encode("the lazy fox")
    assert tokenizer.decode(ids) == "the lazy fox"
    assert engine.model_config.vocab_size == 259
