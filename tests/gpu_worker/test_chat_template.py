"""The worker's chat rendering against Hugging Face's `apply_chat_template` (the oracle) on a
model folder with its own template, and the documented default for folders without one."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from services.common.config import ConfigError
from services.common.errors import InvalidArgument
from services.gpu_worker.engine.chat_template import (
    chat_template_for,
    default_chat_template,
    load_chat_template,
)
from services.gpu_worker.engine.tokenizer import ByteTokenizer, HFTokenizer
from tests.gpu_worker.chat_folder import CHATML, LLAMA2_LIKE, as_dicts, chat, model_folder

CONVERSATION = chat(
    ("system", "You are kind."),
    ("user", "the quick brown fox?"),
    ("assistant", "jumps over the lazy dog."),
    ("user", "be brief"),
)


@pytest.mark.parametrize(
    ("template", "as_file"), [(LLAMA2_LIKE, False), (CHATML, True), (CHATML, False)]
)
def test_model_template_matches_apply_chat_template(tmp_path: Path, template: str, as_file: bool):
    folder = model_folder(tmp_path, template, as_file)
    hf = AutoTokenizer.from_pretrained(str(folder))
    tokenizer = HFTokenizer(folder)
    ours = chat_template_for(tokenizer)
    expected_text = hf.apply_chat_template(
        as_dicts(CONVERSATION), tokenize=False, add_generation_prompt=True
    )
    expected_ids = hf.apply_chat_template(
        as_dicts(CONVERSATION), tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert ours.render(CONVERSATION) == expected_text
    assert ours.encode(tokenizer, CONVERSATION) == list(expected_ids)


def test_named_templates_use_the_default_one(tmp_path: Path):
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CHATML}]
    folder = model_folder(tmp_path, named, as_file=False)
    template = load_chat_template(folder)
    assert template is not None
    assert template.render(chat(("user", "hi"))) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_refusal_is_invalid_argument(tmp_path: Path):
    template = load_chat_template(model_folder(tmp_path, LLAMA2_LIKE, as_file=False))
    assert template is not None
    with pytest.raises(InvalidArgument, match="roles must alternate"):
        template.render(chat(("user", "a"), ("user", "b")))


def test_broken_template_stops_the_worker_naming_the_flag(tmp_path: Path):
    folder = model_folder(tmp_path, "{% for m in messages %}", as_file=False)
    with pytest.raises(ConfigError, match=r"--model .*chat template does not compile"):
        load_chat_template(folder)


def test_folder_without_template_and_byte_tokenizer_use_the_documented_default(tmp_path: Path):
    folder = model_folder(tmp_path, None, as_file=False)
    assert load_chat_template(folder) is None
    byte = ByteTokenizer()
    for tokenizer in (HFTokenizer(folder), byte):
        template = chat_template_for(tokenizer)
        assert template.source == default_chat_template().source
    text = "system: You are kind.\nuser: hi\nassistant: hello\nuser: bye\nassistant:"
    conversation = chat(
        ("system", "You are kind."), ("user", "hi"), ("assistant", "hello"), ("user", "bye")
    )
    template = chat_template_for(byte)
    assert template.render(conversation) == text
    # Tokenized as a text prompt is: BOS, then the bytes.
    assert template.encode(byte, conversation) == [1, *(b + 3 for b in text.encode())]
