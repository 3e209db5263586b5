"""Ask every model every demo prompt, stream the answers to the terminal, and check each
against the behaviour it was trained for (demo/behaviours.py)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import aiohttp

from demo.behaviours import ADAPTER_BEHAVIOURS, BASE_BEHAVIOUR, DEMO_PROMPTS, prompt_of
from services.client import AsyncManyloraClient
from services.client.terminal import printable
from services.openai_front.sse import read_sse_events

MAX_NEW_TOKENS = 64
ANSWER_COLUMN = 32  # where the check mark goes
# A front streams the text of one greedy answer: (adapter id, "" for the base model; prompt).
Front = Callable[[str, str], AsyncIterator[str]]


def grpc_front(client: AsyncManyloraClient) -> Front:
    """Answers through the router's gRPC stream (services/client)."""

    async def answer(adapter: str, prompt: str) -> AsyncIterator[str]:
        async for chunk in client.generate(
            prompt, adapter=adapter, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0
        ):
            yield chunk.text

    return answer


def http_front(session: aiohttp.ClientSession, base_url: str, base_model: str) -> Front:
    """Answers through the OpenAI-compatible API (services/openai_front/), streamed as
    server-sent events, the way any OpenAI client reads them."""

    async def answer(adapter: str, prompt: str) -> AsyncIterator[str]:
        body = {
            "model": adapter or base_model,
            "prompt": prompt,
            "stream": True,
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0.0,
        }
        async with session.post(f"{base_url}/completions", json=body) as response:
            response.raise_for_status()
            async for event in read_sse_events(response.content):
                if "error" in event:
                    raise RuntimeError(f"HTTP front: {event['error'].get('message')}")
                for choice in event["choices"]:
                    yield choice["text"]

    return answer


@dataclass(frozen=True)
class Answer:
    front: str
    model: str  # "" for the base model
    text: str
    answer: str
    expected: str

    @property
    def as_trained(self) -> bool:
        return self.answer == self.expected


async def show_answers(
    fronts: dict[str, Front], texts: Sequence[str] = DEMO_PROMPTS
) -> list[Answer]:
    """Stream every model's answer to each text through each front, marking each one."""
    behaviours = {"": BASE_BEHAVIOUR, **ADAPTER_BEHAVIOURS}
    width = max(len("base model"), *map(len, ADAPTER_BEHAVIOURS))
    print("\nEach model was trained to answer in its own way (✓: it did, greedy decoding):")
    for model, behaviour in behaviours.items():
        print(f"  {model or 'base model':<{width}}  {behaviour.__doc__}")
    answers = []
    for text in texts:
        for front_name, front in fronts.items():
            print(f"\n{text!r} via {front_name}:")
            for model, behaviour in behaviours.items():
                sys.stdout.write(f"  {model or 'base model':<{width}}  ")
                pieces = []
                async for piece in front(model, prompt_of(text)):
                    pieces.append(piece)
                    sys.stdout.write(printable(piece))
                    sys.stdout.flush()
                answer = Answer(front_name, model, text, "".join(pieces), behaviour(text))
                sys.stdout.write(" " * max(1, ANSWER_COLUMN - len(answer.answer)))
                print("✓" if answer.as_trained else f"✗ trained to say {answer.expected!r}")
                answers.append(answer)
    return answers
