"""Checks of a GenerateRequest that need no model: shared by the router (at the front, without
torch) and the worker (which adds the checks that need its vocabulary)."""

from __future__ import annotations

import math

from manylora.v1 import common_pb2
from services.common.errors import InvalidArgument

MAX_STOP_STRINGS = 16


def check_sampling_params(params: common_pb2.SamplingParams, vocab_size: int | None = None) -> None:
    """Raise InvalidArgument naming the bad field; token ids are checked only with a vocab."""
    if params.max_new_tokens <= 0:
        raise InvalidArgument("params.max_new_tokens must be > 0")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidArgument(f"params.temperature must be >= 0, got {params.temperature}")
    if not math.isfinite(params.top_p) or not 0 <= params.top_p <= 1:
        raise InvalidArgument(f"params.top_p must lie in (0, 1] (0 = off), got {params.top_p}")
    if len(params.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"params.stop has more than {MAX_STOP_STRINGS} strings")
    if vocab_size is not None:
        bad_ids = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad_ids:
            raise InvalidArgument(
                f"params.stop_token_ids {bad_ids} outside vocabulary of {vocab_size}"
            )


def check_input(request: common_pb2.GenerateRequest) -> None:
    """The prompt is there and not empty (its length against the model is the worker's check)."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("one of prompt or prompt_token_ids is required")
    if kind == "prompt" and not request.prompt:
        raise InvalidArgument("prompt is empty")
    if kind == "prompt_token_ids" and not request.prompt_token_ids.ids:
        raise InvalidArgument("prompt is empty")
