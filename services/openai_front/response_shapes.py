"""The JSON objects of OpenAI's completions and chat completions, whole and as stream chunks.

The front holds no tokenizer, so a token in `logprobs` is named `token_id:N` (vLLM's form
with `return_tokens_as_token_ids`), and completions' `text_offset` is left out.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from manylora.v1 import common_pb2

FINISH_REASONS = {
    common_pb2.LENGTH: "length",
    common_pb2.STOP: "stop",
    common_pb2.EOS: "stop",
    common_pb2.ABORTED: "abort",  # the server ended it (shutdown); vLLM's word
}


def finish_reason(response: common_pb2.GenerateResponse) -> str | None:
    return FINISH_REASONS.get(response.finish_reason)


def usage_json(usage: common_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def token_name(token_id: int) -> str:
    return f"token_id:{token_id}"


class Shape:
    """One response's envelope: its id, creation time and model, shared by all its chunks."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, model: str, logprobs: bool):
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model
        self.logprobs = logprobs

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(
        self,
        text: str,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        finish: str | None,
        usage: common_pb2.Usage,
    ) -> dict[str, Any]:
        choice = self._choice(text, token_ids, logprobs, finish, streaming=False)
        body = self._envelope(self.object_name, [choice])
        body["usage"] = usage_json(usage)
        return body

    def chunk(self, response: common_pb2.GenerateResponse) -> dict[str, Any]:
        choice = self._choice(
            response.text,
            response.token_ids,
            response.logprobs,
            finish_reason(response),
            streaming=True,
        )
        return self._envelope(self.chunk_object_name, [choice])

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    def usage_chunk(self, usage: common_pb2.Usage) -> dict[str, Any]:
        """The last chunk of a stream with `include_usage`: no choices, the usage."""
        body = self._envelope(self.chunk_object_name, [])
        body["usage"] = usage_json(usage)
        return body

    def _choice(
        self,
        text: str,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        finish: str | None,
        streaming: bool,
    ) -> dict[str, Any]:
        raise NotImplementedError


class CompletionShape(Shape):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def _choice(
        self,
        text: str,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        finish: str | None,
        streaming: bool,
    ) -> dict[str, Any]:
        return {
            "index": 0,
            "text": text,
            "logprobs": self._logprobs(token_ids, logprobs),
            "finish_reason": finish,
        }

    def _logprobs(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> Any:
        if not self.logprobs:
            return None
        return {
            "tokens": [token_name(t) for t in token_ids],
            "token_logprobs": list(logprobs),
            "top_logprobs": None,
        }


class ChatShape(Shape):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def opening_chunks(self) -> list[dict[str, Any]]:
        # OpenAI's first chunk names the role, with empty content.
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [self._envelope(self.chunk_object_name, [choice])]

    def _choice(
        self,
        text: str,
        token_ids: Sequence[int],
        logprobs: Sequence[float],
        finish: str | None,
        streaming: bool,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if streaming:
            choice["delta"] = {"content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = self._logprobs(token_ids, logprobs)
        choice["finish_reason"] = finish
        return choice

    def _logprobs(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> Any:
        if not self.logprobs:
            return None
        return {
            "content": [
                {"token": token_name(t), "logprob": lp, "bytes": None, "top_logprobs": []}
                for t, lp in zip(token_ids, logprobs, strict=True)
            ]
        }
