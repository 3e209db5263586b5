"""The OpenAI front holds no token: each HTTP client's `Authorization: Bearer` travels to a
router that checks tokens, which scopes that client as if it called directly. Bad tokens get
OpenAI's 401 and 403, and a good client streams meanwhile."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.e2e.stack import Stack
from tests.openai_front.conftest import openai_client, start_front
from tests.security.conftest import Tokens


async def complete(client: openai.AsyncOpenAI, model: str) -> str:
    answer = await client.completions.create(
        model=model, prompt="hello", max_tokens=4, temperature=0.0, extra_body={"ignore_eos": True}
    )
    return answer.choices[0].text


async def test_front_passes_each_clients_token_to_a_secured_router(
    secured: Stack, tokens: Tokens
) -> None:
    router = secured.routers[0]
    front = await start_front(router.port)
    try:
        good = openai_client(front, api_key=tokens.generate)
        good_stream = asyncio.create_task(complete(good, "ad"))
        refused = {
            tokens.expired: openai.AuthenticationError,
            tokens.forged: openai.AuthenticationError,
            "not-a-token": openai.AuthenticationError,
            tokens.write: openai.PermissionDeniedError,  # a valid token without `generate`
            tokens.service: openai.PermissionDeniedError,
        }
        for token, error in refused.items():
            with pytest.raises(error):
                await complete(openai_client(front, api_key=token), "ad")
            with pytest.raises(error):
                await openai_client(front, api_key=token).models.list()
        assert len(await good_stream) > 0
        listed = [m.id for m in (await good.models.list()).data]
        assert "ad" in listed
        assert len(await complete(good, "tiny")) > 0
    finally:
        await front.stop()
