"""Every caller-supplied field of a GenerateRequest is bounded, and refusals quote it briefly."""

from __future__ import annotations

import pytest

from manylora.v1 import common_pb2
from services.common.errors import MAX_STATUS_DETAILS_BYTES, InvalidArgument, status_details
from services.common.validation import (
    UndecodableRequest,
    check_generate_request,
    excerpt,
    lenient_deserializer,
)

MAX_MESSAGE = 300  # far below gRPC's 8 KiB metadata limit, even percent-encoded


def _request(**fields: object) -> common_pb2.GenerateRequest:
    params = fields.pop("params", common_pb2.SamplingParams(max_new_tokens=4))
    base: dict[str, object] = {"prompt": "hello", "params": params}
    base.update(fields)
    return common_pb2.GenerateRequest(**base)  # type: ignore[arg-type]


def _params(**fields: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**{"max_new_tokens": 4, **fields})  # type: ignore[arg-type]


def _chat(*messages: tuple[str, str]) -> common_pb2.GenerateRequest:
    chat = common_pb2.ChatPrompt(
        messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages]
    )
    return common_pb2.GenerateRequest(chat=chat, params=_params())


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (_request(request_id="r" * 20_000), "request_id"),
        (_request(request_id="id\nwith newline"), "request_id"),
        (_request(request_id="ü-ünïcode"), "request_id"),
        (_request(adapter_id="a" * 20_000), "adapter_id"),
        (_request(adapter_id="../etc/passwd"), "adapter_id"),
        (_request(adapter_id=".hidden"), "adapter_id"),
        (_request(prompt="x" * ((1 << 20) + 1)), "prompt"),
        (_request(prompt=""), "prompt"),
        (
            common_pb2.GenerateRequest(
                prompt_token_ids=common_pb2.PromptTokenIds(ids=[1] * ((1 << 17) + 1)),
                params=_params(),
            ),
            "prompt",
        ),
        (_request(params=_params(stop=["s"] * 17)), "params.stop"),
        (_request(params=_params(stop=["ok", "s" * 10_000])), "params.stop[1]"),
        (_request(params=_params(stop_token_ids=list(range(257)))), "stop_token_ids"),
        (_request(params=_params(stop_token_ids=[10**9] * 50)), "stop_token_ids"),
        (_request(params=_params(temperature=float("nan"))), "temperature"),
        (_request(params=_params(temperature=float("inf"))), "temperature"),
        (_request(params=_params(temperature=-1e-45)), "temperature"),
        (_request(params=_params(top_p=float("nan"))), "top_p"),
        (_request(params=_params(top_p=1.5)), "top_p"),
        (_request(params=common_pb2.SamplingParams()), "max_new_tokens"),
        (_chat(), "chat.messages is empty"),
        (_chat(("user", "hi"), ("tool", "42")), r"chat.messages[1].role 'tool'"),
        (_chat(("r" * 10_000, "hi")), "chat.messages[0].role"),
        (_chat(*[("user", "hi")] * 1025), "1025 messages"),
        (_chat(("system", "x" * (1 << 19)), ("user", "y" * ((1 << 19) + 1))), "characters"),
        (common_pb2.GenerateRequest(params=_params()), "one of prompt"),
    ],
)
def test_bad_fields_are_refused_by_name_with_a_short_message(request_, needle):
    with pytest.raises(InvalidArgument, match=needle.replace("[", r"\[")) as err:
        check_generate_request(request_, vocab_size=259)
    assert len(str(err.value)) < MAX_MESSAGE


@pytest.mark.parametrize(
    "request_",
    [
        _request(request_id="r" * 128, adapter_id="a" * 128),
        _request(request_id="any printable ASCII: ~!@#$%^&*()", adapter_id="my.adapter-1_x"),
        _request(params=_params(temperature=1e-45, top_p=1e-45, top_k=2**32 - 1, seed=2**64 - 1)),
        _request(params=_params(max_new_tokens=2**32 - 1, stop=["", "x" * 128] + ["y"] * 14)),
        _chat(("system", ""), ("user", "x" * (1 << 20))),
        _chat(*[("user", "q"), ("assistant", "a")] * 512),
    ],
)
def test_extreme_but_valid_requests_pass(request_):
    check_generate_request(request_, vocab_size=259)


def test_excerpt_and_status_details_are_bounded():
    assert excerpt("abc") == "'abc'"
    assert len(excerpt("x" * 100_000)) < 80 and "100000 chars" in excerpt("x" * 100_000)
    assert len(status_details("y" * 100_000)) <= MAX_STATUS_DETAILS_BYTES
    emoji = status_details("\U0001f600" * 10_000)  # 4 bytes each in UTF-8
    assert len(emoji.encode()) <= MAX_STATUS_DETAILS_BYTES and "10000 chars" in emoji


def _with_bad_utf8(request: common_pb2.GenerateRequest, marker: str) -> bytes:
    data = request.SerializeToString()
    assert data.count(marker.encode()) == 1
    return data.replace(marker.encode(), b"\xff\xfe" + b"_" * (len(marker) - 2))


@pytest.mark.parametrize(
    ("request_", "marker", "field"),
    [
        (_request(prompt="PROMPT"), "PROMPT", "prompt"),
        (_request(request_id="RID"), "RID", "request_id"),
        (_request(adapter_id="ADAPTER"), "ADAPTER", "adapter_id"),
        (_request(params=_params(stop=["ok", "STOP"])), "STOP", "params.stop[1]"),
        (_chat(("user", "hi"), ("user", "CONTENT")), "CONTENT", "chat.messages.content"),
    ],
)
def test_invalid_utf8_is_named_by_field(request_, marker, field):
    decode = lenient_deserializer(common_pb2.GenerateRequest.FromString)
    decoded = decode(_with_bad_utf8(request_, marker))
    assert isinstance(decoded, UndecodableRequest)
    assert decoded.reason.startswith(f"{field} is not valid UTF-8")


def test_garbage_bytes_are_undecodable_and_good_bytes_decode():
    decode = lenient_deserializer(common_pb2.GenerateRequest.FromString)
    garbage = decode(b"\xff" * 64)
    assert isinstance(garbage, UndecodableRequest)
    assert "not a valid manylora.v1.GenerateRequest" in garbage.reason
    good = _request(request_id="r1")
    assert decode(good.SerializeToString()) == good
