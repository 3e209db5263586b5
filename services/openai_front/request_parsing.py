"""OpenAI request bodies to the router's GenerateRequest.

Mapped: `model` (the base model's name, or an adapter id, `id@N` pinning version N),
`prompt` (text or token ids) or `messages` (text parts only; `developer` is `system`),
`max_tokens` (`max_completion_tokens` in chat), `temperature` (default 1, as OpenAI's),
`top_p`, `stop`, `seed`, `logprobs` (the chosen tokens' only), `stream`,
`stream_options.include_usage`, and vLLM's extensions `top_k` and `ignore_eos`.
Left at their neutral value or out: `n` and `best_of` (1), `echo`, `suffix`, penalties,
`logit_bias`, `top_logprobs`, tools. Any other field is refused with a 400 naming it.
Bounds that the router enforces (stop strings, prompt sizes, roles) are left to it, so that
one rule holds for every caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from manylora.v1 import common_pb2
from services.common.errors import InvalidArgument
from services.common.validation import check_adapter_id, excerpt
from services.openai_front.errors import ApiError, bad_request
from services.openai_front.fields import (
    Body,
    boolean,
    integer,
    is_int,
    number,
    refuse_unsupported,
    shown,
    string,
    string_list,
)

MAX_UINT32 = (1 << 32) - 1
MAX_UINT64 = (1 << 64) - 1
# OpenAI's default max_tokens of a completion.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# top_p = 0 asks for the single most likely token; the contract reads 0 as "no filter".
SMALLEST_TOP_P = 1e-9

_COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "logprobs",
        "ignore_eos",
        "user",
        "metadata",
        "store",
        "service_tier",
    }
)
_DEFAULT_ONLY: dict[str, Any] = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
}
COMPLETION_FIELDS = _COMMON | {"prompt"}
COMPLETION_DEFAULT_ONLY = {**_DEFAULT_ONLY, "best_of": 1, "echo": False, "suffix": ""}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "parallel_tool_calls"}
CHAT_DEFAULT_ONLY = {
    **_DEFAULT_ONLY,
    "top_logprobs": 0,
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "response_format": {"type": "text"},
}


@dataclass
class ParsedRequest:
    """What the handler needs: the call to make and how to answer."""

    generate: common_pb2.GenerateRequest
    model: str
    stream: bool
    include_usage: bool
    logprobs: bool


def parse_completion(body: Body, base_model: str) -> ParsedRequest:
    refuse_unsupported(body, COMPLETION_FIELDS, COMPLETION_DEFAULT_ONLY)
    with _unicode_checked():
        request = common_pb2.GenerateRequest()
        _set_prompt(request, body.get("prompt"))
        max_tokens = integer(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, 1, MAX_UINT32)
        logprobs = _completion_logprobs(body)
        return _finish(body, request, base_model, max_tokens, logprobs)


def parse_chat(body: Body, base_model: str, default_max_tokens: int) -> ParsedRequest:
    refuse_unsupported(body, CHAT_FIELDS, CHAT_DEFAULT_ONLY)
    with _unicode_checked():
        request = common_pb2.GenerateRequest()
        request.chat.messages.extend(_messages(body.get("messages")))
        max_tokens = integer(body, "max_tokens", None, 1, MAX_UINT32)
        max_completion = integer(body, "max_completion_tokens", None, 1, MAX_UINT32)
        if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
            raise bad_request("max_tokens and max_completion_tokens differ; give one", "max_tokens")
        chosen = max_completion or max_tokens or default_max_tokens or MAX_UINT32
        return _finish(body, request, base_model, chosen, boolean(body, "logprobs"))


@contextlib.contextmanager
def _unicode_checked() -> Iterator[None]:
    """JSON may escape a lone surrogate (`"\\ud800"`), which protobuf strings refuse."""
    try:
        yield
    except UnicodeEncodeError:
        raise bad_request(
            "a string of the body is not valid Unicode (it holds a lone surrogate escape)"
        ) from None


def _finish(
    body: Body,
    request: common_pb2.GenerateRequest,
    base_model: str,
    max_tokens: int | None,
    logprobs: bool,
) -> ParsedRequest:
    model = string(body, "model")
    request.adapter_id = adapter_of(model, base_model)
    _set_params(request.params, body)
    request.params.max_new_tokens = max_tokens or MAX_UINT32
    request.params.logprobs = logprobs
    stream = boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    include_usage = stream and boolean(options or {}, "include_usage")
    return ParsedRequest(request, model, stream, include_usage, logprobs)


def adapter_of(model: str, base_model: str) -> str:
    """The adapter a `model` names ("" for the base model); a name that cannot be an adapter
    is a model that does not exist (404), as OpenAI's API says of unknown models."""
    if model == base_model:
        return ""
    try:
        check_adapter_id(model)
    except InvalidArgument as exc:
        raise ApiError(
            404,
            f"model {excerpt(model)} does not exist: it is not the base model {base_model!r} "
            f"and cannot be an adapter ({exc})",
            "model",
            "model_not_found",
        ) from None
    return model


def _set_params(params: common_pb2.SamplingParams, body: Body) -> None:
    params.temperature = number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = number(body, "top_p", 1.0, 0.0, 1.0)
    params.top_p = top_p if top_p > 0 else SMALLEST_TOP_P
    params.top_k = max(0, integer(body, "top_k", 0, -1, MAX_UINT32) or 0)  # -1: off, as vLLM
    seed = integer(body, "seed", None, -(1 << 63), MAX_UINT64)
    if seed is not None:  # negative seeds (OpenAI allows int64) map one-to-one into uint64
        params.seed = seed & MAX_UINT64
    # An empty stop string would end every generation at once; OpenAI ignores it.
    params.stop.extend(s for s in string_list(body, "stop") if s)
    params.ignore_eos = boolean(body, "ignore_eos")


def _completion_logprobs(body: Body) -> bool:
    """Completions' `logprobs` is how many alternatives to return besides the chosen token:
    only 0 is served (the engine computes the chosen token's log-probability alone)."""
    value = body.get("logprobs")
    if value is None or value is False:
        return False
    if value is True or value == 0:
        return True
    raise bad_request(
        f"logprobs={shown(value)} is not supported: only 0 (the chosen tokens' "
        "log-probabilities, without alternatives)",
        "logprobs",
    )


def _set_prompt(request: common_pb2.GenerateRequest, prompt: Any) -> None:
    """A string, token ids, or a list holding one of those; a batch of prompts is refused
    (one completion per request, as n = 1)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        request.prompt = prompt
        return
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        if not all(0 <= t <= MAX_UINT32 for t in prompt):
            raise bad_request("prompt token ids must lie in [0, 2^32)", "prompt")
        request.prompt_token_ids.ids.extend(prompt)
        return
    if (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, str | list) for p in prompt)
    ):
        raise bad_request(
            f"a batch of {len(prompt)} prompts is not supported; send one prompt per request",
            "prompt",
        )
    raise bad_request(
        "prompt is required: a non-empty string, a list of token ids, or a list of one of those",
        "prompt",
    )


def _messages(messages: Any) -> list[common_pb2.ChatMessage]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages is required: a non-empty list", "messages")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message: Any, index: int) -> common_pb2.ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object", where)
    role = message.get("role")
    if not isinstance(role, str):
        raise bad_request(f"{where}.role must be a string", f"{where}.role")
    if message.get("tool_calls") or message.get("function_call"):
        raise bad_request(f"{where}: tool calls are not supported", f"{where}.tool_calls")
    # OpenAI's newer name of the system role; the router checks the rest.
    role = "system" if role == "developer" else role
    return common_pb2.ChatMessage(role=role, content=_content(message.get("content"), where))


def _content(content: Any, where: str) -> str:
    """A string, or a list of text parts joined by newlines (as vLLM joins them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", f"{where}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise bad_request(
                f"{where}.content[{j}]: only text parts are supported (got type {shown(kind)})",
                f"{where}.content",
            )
        texts.append(part["text"])
    return "\n".join(texts)
