"""Completions and chat completions through the HTTP front with the official `openai` client,
streamed and whole, for the base model and adapters: each gives exactly what the same request
gives through the router's gRPC API (tokens, text, usage), and the stream's wire format is
OpenAI's (server-sent events, the usage chunk, `data: [DONE]` last)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from openai import AsyncOpenAI, NotFoundError

from manylora.v1 import common_pb2, router_pb2_grpc
from services.client import AsyncManyloraClient
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.random_adapters import save_random_peft_adapter
from tests.openai_front.conftest import ADAPTERS, BASE, Served, openai_client, start_front

PROMPT = "Once upon a time"
TOKENS = 16
MESSAGES: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me a story."},
]


async def grpc_generate(
    target: str, request: common_pb2.GenerateRequest
) -> list[common_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        return [r async for r in stub.Generate(request, timeout=60)]


def chat_request(adapter: str, **params: object) -> common_pb2.GenerateRequest:
    messages = [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES]
    return common_pb2.GenerateRequest(
        adapter_id=adapter,
        chat=common_pb2.ChatPrompt(messages=messages),
        params=common_pb2.SamplingParams(**params),  # type: ignore[arg-type]
    )


def ids_of(tokens: list[str] | None) -> list[int]:
    assert tokens is not None
    return [int(t.removeprefix("token_id:")) for t in tokens]


@pytest.mark.parametrize("model", [BASE, *ADAPTERS])
async def test_greedy_completion_is_the_grpc_paths(
    client: AsyncOpenAI, grpc_client: AsyncManyloraClient, model: str
):
    adapter = "" if model == BASE else model
    expected = await grpc_client.complete(
        PROMPT, adapter=adapter, max_new_tokens=TOKENS, temperature=0, ignore_eos=True
    )
    got = await client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=TOKENS,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    choice = got.choices[0]
    assert choice.text == expected.text
    assert choice.logprobs is not None
    assert ids_of(choice.logprobs.tokens) == expected.token_ids
    assert choice.finish_reason == "length"
    assert got.model == model and got.object == "text_completion"
    assert got.usage is not None and expected.usage is not None
    assert got.usage.prompt_tokens == expected.usage.prompt_tokens == len(PROMPT) + 1
    assert got.usage.completion_tokens == TOKENS
    assert got.usage.total_tokens == len(PROMPT) + 1 + TOKENS


async def test_adapters_change_the_answer(client: AsyncOpenAI):
    texts = []
    for model in (BASE, *ADAPTERS):
        got = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, logprobs=0
        )
        assert got.choices[0].logprobs is not None
        texts.append(tuple(ids_of(got.choices[0].logprobs.tokens)))
    assert len(set(texts)) == len(texts)


async def test_token_id_prompt_and_sampling_params_reach_the_worker(
    client: AsyncOpenAI, grpc_client: AsyncManyloraClient
):
    prompt = [1, 72, 105, 33]
    expected = await grpc_client.complete(
        prompt,
        adapter="ad8",
        max_new_tokens=TOKENS,
        ignore_eos=True,
        logprobs=True,
        temperature=0.9,
        top_p=0.8,
        seed=1234,
    )
    got = await client.completions.create(
        model="ad8",
        prompt=prompt,
        max_tokens=TOKENS,
        logprobs=0,
        extra_body={"ignore_eos": True},
        temperature=0.9,
        top_p=0.8,
        seed=1234,
    )
    logprobs = got.choices[0].logprobs
    assert logprobs is not None
    assert ids_of(logprobs.tokens) == expected.token_ids
    assert logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-6)
    assert len(expected.logprobs) == TOKENS


async def test_temperature_defaults_to_openais_one(
    client: AsyncOpenAI, grpc_client: AsyncManyloraClient
):
    expected = await grpc_client.complete(
        PROMPT, max_new_tokens=TOKENS, ignore_eos=True, temperature=1.0, seed=5
    )
    got = await client.completions.create(
        model=BASE,
        prompt=PROMPT,
        max_tokens=TOKENS,
        seed=5,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    assert got.choices[0].logprobs is not None
    assert ids_of(got.choices[0].logprobs.tokens) == expected.token_ids


async def test_stop_string_ends_the_completion_as_on_grpc(
    client: AsyncOpenAI, grpc_client: AsyncManyloraClient
):
    greedy = await grpc_client.complete(PROMPT, max_new_tokens=24, temperature=0, ignore_eos=True)
    stop = greedy.text[len(greedy.text) // 2 :][:2]
    expected = await grpc_client.complete(
        PROMPT, max_new_tokens=24, temperature=0, ignore_eos=True, stop=[stop]
    )
    got = await client.completions.create(
        model=BASE,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        stop=stop,
        extra_body={"ignore_eos": True},
    )
    assert expected.finish_reason == "stop"
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == expected.text == greedy.text[: greedy.text.index(stop)]


@pytest.mark.parametrize("model", [BASE, "ad16"])
async def test_greedy_chat_is_the_grpc_paths(client: AsyncOpenAI, served: Served, model: str):
    adapter = "" if model == BASE else model
    request = chat_request(adapter, max_new_tokens=TOKENS, ignore_eos=True, logprobs=True)
    expected = await grpc_generate(served.router_target, request)
    got = await client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=TOKENS,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    choice = got.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(r.text for r in expected)
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert ids_of([t.token for t in choice.logprobs.content]) == [
        t for r in expected for t in r.token_ids
    ]
    # The default template's text, tokenized with BOS: the prompt's length is known.
    rendered = "system: Be brief.\nuser: Tell me a story.\nassistant:"
    assert got.usage is not None
    assert got.usage.prompt_tokens == expected[-1].usage.prompt_tokens == len(rendered) + 1
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")


async def test_streamed_chat_with_usage_matches_the_whole_answer(client: AsyncOpenAI):
    params: dict[str, Any] = {
        "model": "ad8",
        "messages": MESSAGES,
        "max_tokens": TOKENS,
        "temperature": 0,
    }
    whole = await client.chat.completions.create(**params)
    stream = await client.chat.completions.create(
        **params, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    # The last chunk has no choices and the usage; every other chunk's usage is null.
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_streamed_completion_without_usage(client: AsyncOpenAI):
    params: dict[str, Any] = {
        "model": "ad16",
        "prompt": PROMPT,
        "max_tokens": TOKENS,
        "temperature": 0,
    }
    whole = await client.completions.create(**params)
    chunks = [c async for c in await client.completions.create(**params, stream=True)]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


async def test_stream_wire_format_ends_with_done(served: Served):
    body = {
        "model": "ad8",
        "prompt": PROMPT,
        "max_tokens": 4,
        "ignore_eos": True,  # sampled (temperature 1): an early EOS would end it sooner
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{served.front.url}/completions", json=body) as reply,
    ):
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        raw = (await reply.read()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert payloads[-1]["usage"]["completion_tokens"] == 4 and payloads[-1]["choices"] == []


async def test_models_lists_the_base_and_every_adapter_with_pinned_versions(
    client: AsyncOpenAI, served: Served, tmp_path: Path
):
    listed = {m.id: m for m in (await client.models.list()).data}
    assert set(listed) == {BASE, *ADAPTERS}
    assert all(listed[a].model_extra == {"root": a, "parent": BASE, "version": 1} for a in ADAPTERS)
    # A second upload of ad8 is its version 2; version 1 stays servable by pinning it.
    shape = BaseModelShape.from_hf_config(load_hf_config(BASE))
    await served.stack.upload({"ad8": save_random_peft_adapter(tmp_path / "v2", shape, 8, seed=9)})
    listed = {m.id: m for m in (await client.models.list()).data}
    assert listed["ad8"].model_extra is not None and listed["ad8"].model_extra["version"] == 2
    answers = []
    for model in ("ad8@1", "ad8@2"):
        got = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0, logprobs=0
        )
        assert got.choices[0].logprobs is not None
        answers.append(ids_of(got.choices[0].logprobs.tokens))
    assert answers[0] != answers[1]
    with pytest.raises(NotFoundError, match="ad8@3"):
        await client.completions.create(model="ad8@3", prompt=PROMPT, max_tokens=2)


async def test_a_router_without_a_store_lists_the_base_model_alone(served: Served):
    router = await served.stack.start_router(adapter_store="")
    front = await start_front(router.port)
    try:
        async with openai_client(front) as client:
            assert [m.id for m in (await client.models.list()).data] == [BASE]
    finally:
        await front.stop()
