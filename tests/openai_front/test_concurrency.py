"""Streams in flight through the front are untouched by other clients' bad requests and
disconnects: each finishes with exactly the text it gets alone, while the bad ones get their
own errors."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
from openai import AsyncOpenAI

from services.client import AsyncManyloraClient
from tests.openai_front.conftest import BASE, Served

TOKENS = 48
STREAMS = [(BASE, "first story"), ("ad8", "second story"), ("ad16", "third story")] * 2


async def stream_text(client: AsyncOpenAI, model: str, prompt: str) -> str:
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    parts = []
    async for chunk in stream:
        parts.append(chunk.choices[0].text)
        await asyncio.sleep(0)  # let the troublemakers in between tokens
    return "".join(parts)


async def troublemakers(client: AsyncOpenAI, served: Served) -> list[str]:
    """Bad requests and a client that leaves mid-stream; what each got."""
    outcomes = []
    for params in (
        {"model": BASE, "prompt": "x", "n": 2},
        {"model": "no-such-adapter", "prompt": "x"},
        {"model": "ad8", "prompt": "x", "temperature": -1},
        {"model": "ad8", "prompt": "", "stream": True},
    ):
        try:
            await client.completions.create(max_tokens=4, **params)
        except openai.APIStatusError as exc:
            outcomes.append(str(exc.status_code))
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{served.front.url}/chat/completions", data=b'{"model": ') as reply,
    ):
        outcomes.append(str(reply.status))
    leaver = await client.completions.create(
        model="ad16", prompt="x", max_tokens=500, stream=True, extra_body={"ignore_eos": True}
    )
    await anext(aiter(leaver))
    await leaver.close()
    outcomes.append("left")
    return outcomes


async def test_streams_are_unaffected_by_other_clients(
    client: AsyncOpenAI, grpc_client: AsyncManyloraClient, served: Served
):
    alone = []
    for model, prompt in STREAMS[:3]:
        done = await grpc_client.complete(
            prompt, adapter="" if model == BASE else model, max_new_tokens=TOKENS, ignore_eos=True
        )
        alone.append(done.text)
    streams = [asyncio.create_task(stream_text(client, m, p)) for m, p in STREAMS]
    outcomes = await troublemakers(client, served)
    assert not all(s.done() for s in streams)  # the trouble came while they streamed
    texts = await asyncio.gather(*streams)
    assert outcomes == ["400", "404", "400", "400", "400", "left"]
    assert texts == alone * 2
