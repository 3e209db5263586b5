"""Chat prompts to token ids, where the tokenizer lives: the model folder's chat template
rendered with jinja2 as Hugging Face's `apply_chat_template(..., add_generation_prompt=True)`
renders it, or a plain default for models without one.

The template comes from `chat_template.jinja` (where recent transformers save it) or else
`tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of which
"default" is used). It sees `messages` (dicts of role and content), `add_generation_prompt`
(true) and the special tokens named in the folder (`bos_token`, `eos_token`, ...), and may call
`raise_exception(message)`, which refuses the conversation with INVALID_ARGUMENT. Its text is
tokenized without special tokens: the template places them, as HF does.

The default (models without a template, and the dummy models' byte tokenizer) is one line per
message, `role: content`, then `assistant:`; it is tokenized as a text prompt is (BOS added).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from manylora.v1 import common_pb2
from services.common.config import ConfigError
from services.common.errors import InvalidArgument
from services.gpu_worker.engine.tokenizer import HFTokenizer, Tokenizer

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")
# Longest part of a template's own error message passed back to the caller.
MAX_TEMPLATE_ERROR_CHARS = 200


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters, which no chat template wants.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    # A sandbox: the template is the operator's, but it loops over callers' messages.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled template, the special tokens it may use, and how its text is tokenized."""

    def __init__(
        self,
        source: str,
        special_tokens: dict[str, str] | None = None,
        add_special_tokens: bool = False,
    ):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        # False for a model's own template (it writes its BOS itself), True for the default.
        self.add_special_tokens = add_special_tokens
        self._template = _environment().from_string(source)  # TemplateSyntaxError if broken

    def render(self, messages: Sequence[common_pb2.ChatMessage]) -> str:
        """The prompt text; InvalidArgument when the template refuses the conversation."""
        as_dicts = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._template.render(
                messages=as_dicts, add_generation_prompt=True, **self.special_tokens
            )
        except jinja2.exceptions.TemplateError as exc:
            reason = str(exc)[:MAX_TEMPLATE_ERROR_CHARS]
            raise InvalidArgument(f"chat: the model's chat template refused it: {reason}") from None

    def encode(self, tokenizer: Tokenizer, messages: Sequence[common_pb2.ChatMessage]) -> list[int]:
        return tokenizer.encode(self.render(messages), add_special_tokens=self.add_special_tokens)


def default_chat_template() -> ChatTemplate:
    return ChatTemplate(DEFAULT_CHAT_TEMPLATE, add_special_tokens=True)


def chat_template_for(tokenizer: Tokenizer) -> ChatTemplate:
    """The template of the tokenizer's model folder, else the default."""
    if isinstance(tokenizer, HFTokenizer):
        found = load_chat_template(tokenizer.folder)
        if found is not None:
            return found
    return default_chat_template()


def load_chat_template(folder: str | Path) -> ChatTemplate | None:
    """The folder's template with its special tokens; None when it has none."""
    folder = Path(folder)
    config = _read_json(folder / CONFIG_FILE)
    template_file = folder / TEMPLATE_FILE
    if template_file.is_file():
        source: str | None = template_file.read_text()
    else:
        source = _template_from_config(config.get("chat_template"))
    if source is None:
        return None
    try:
        return ChatTemplate(source, _special_tokens(folder, config))
    except jinja2.exceptions.TemplateSyntaxError as exc:
        # The worker cannot serve chat as its model means it: refuse to start, saying why.
        raise ConfigError("model", f"{folder}: the chat template does not compile: {exc}") from None


def _template_from_config(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


def _special_tokens(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    """Special tokens as strings, tokenizer_config.json's over special_tokens_map.json's; each
    is a string or an AddedToken record with its `content`."""
    merged = {**_read_json(folder / SPECIAL_TOKENS_FILE), **config}
    tokens: dict[str, str] = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = merged.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
