"""A model folder with a chat template for tests: tokenizer.json (a BPE trained here) and
tokenizer_config.json, optionally the weights of a tiny Llama; and chat message helpers."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from manylora.v1 import common_pb2

# Llama-2's shape: BOS per turn, [INST] markers, a system block folded into the first user
# turn, EOS after answers, roles that must alternate (raise_exception otherwise).
LLAMA2_LIKE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim"
    " + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# ChatML with a tojson call, as tool-aware templates use.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{# {{ messages | tojson }} #}"
)
CORPUS = ["the quick brown fox jumps over the lazy dog. You are kind; be brief."] * 50
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]


def chat(*pairs: tuple[str, str]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=r, content=c) for r, c in pairs]


def as_dicts(messages: list[common_pb2.ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def model_folder(tmp: Path, template: str | list[dict[str, str]] | None, as_file: bool) -> Path:
    """tokenizer.json (a BPE trained here) and tokenizer_config.json, the template in the
    config or in chat_template.jinja."""
    tok = RawTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    assert tok.get_vocab_size() <= 320  # the tiny Llama's vocabulary (save_tiny_llama)
    # Text prompts get a BOS, as Llama's tokenizer gives them; a chat template writes its own.
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    tok.save(str(tmp / "tokenizer.json"))
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},  # AddedToken
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    if template is not None and as_file:
        assert isinstance(template, str)
        (tmp / "chat_template.jinja").write_text(template)
    elif template is not None:
        config["chat_template"] = template
    (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp


def save_tiny_llama(folder: Path) -> Path:
    """Random weights of a tiny Llama whose vocabulary covers the tokenizer's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.oracle import TINY_MHA

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY_MHA, "vocab_size": 320})).save_pretrained(folder)
    return folder
