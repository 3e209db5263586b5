"""What the clients send and return: plain Python values, not protobuf messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import grpc

from manylora.v1 import common_pb2

# Worth retrying later: the queue was full, or no worker (or store) could be reached.
RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


class ManyloraError(Exception):
    """A call that ended with an error status; `code` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> ManyloraError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code, details or "")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    queue_time_ms: float
    time_to_first_token_ms: float


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of a completion; the last one has `finish_reason` and `usage`."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop", "eos" or "aborted" on the last chunk
    usage: Usage | None = None
    adapter_version: int = 0  # the adapter version serving the request (0: the base model)


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    usage: Usage
    adapter_version: int = 0  # the adapter version that served it (0: the base model)


class GenerateParams(TypedDict, total=False):
    """Keyword arguments of `generate` and `complete`, as `build_request` takes them."""

    adapter: str
    adapter_version: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: Sequence[str]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    logprobs: bool
    request_id: str


def build_request(
    prompt: str | Sequence[int],
    *,
    adapter: str = "",
    adapter_version: int = 0,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: bool = False,
    request_id: str = "",
) -> common_pb2.GenerateRequest:
    """A GenerateRequest: a str prompt is text, a sequence of ints is token ids. `adapter` may
    pin a version as "id@N"; `adapter_version` does the same (0: the newest when admitted)."""
    params = common_pb2.SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
    )
    if seed is not None:
        params.seed = seed
    request = common_pb2.GenerateRequest(
        request_id=request_id, adapter_id=adapter, adapter_version=adapter_version, params=params
    )
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(prompt)
    return request


def chunk_from_proto(response: common_pb2.GenerateResponse) -> Chunk:
    finish = response.finish_reason
    if finish == common_pb2.FINISH_REASON_UNSPECIFIED:
        return Chunk(
            response.request_id,
            response.text,
            list(response.token_ids),
            list(response.logprobs),
            adapter_version=response.adapter_version,
        )
    u = response.usage
    return Chunk(
        response.request_id,
        response.text,
        list(response.token_ids),
        list(response.logprobs),
        common_pb2.FinishReason.Name(finish).lower(),
        Usage(u.prompt_tokens, u.completion_tokens, u.queue_time_ms, u.time_to_first_token_ms),
        response.adapter_version,
    )


class CompletionBuilder:
    """Joins chunks into a Completion."""

    def __init__(self) -> None:
        self._chunks: list[Chunk] = []

    def add(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)

    def build(self) -> Completion:
        last = self._chunks[-1] if self._chunks else None
        if last is None or last.finish_reason is None or last.usage is None:
            raise ManyloraError(grpc.StatusCode.UNKNOWN, "the stream ended without a last chunk")
        return Completion(
            last.request_id,
            "".join(c.text for c in self._chunks),
            [t for c in self._chunks for t in c.token_ids],
            [p for c in self._chunks for p in c.logprobs],
            last.finish_reason,
            last.usage,
            last.adapter_version,
        )
