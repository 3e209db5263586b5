"""Checks of SamplingParams that need no model: shared by the router (at the front, without
torch) and the worker (which adds the checks that need its vocabulary). Every repeated field
is bounded, and messages never quote more than a few values."""

from __future__ import annotations

import math

from manylora.v1 import common_pb2
from services.common.errors import InvalidArgument

MAX_STOP_STRINGS = 16
# Each step looks for every stop string in the text held back: their length is per-token work.
MAX_STOP_STRING_CHARS = 128
MAX_STOP_TOKEN_IDS = 256


def check_sampling_params(params: common_pb2.SamplingParams, vocab_size: int | None = None) -> None:
    """Raise InvalidArgument naming the bad field; token ids are checked only with a vocab."""
    if params.max_new_tokens <= 0:
        raise InvalidArgument("params.max_new_tokens must be > 0")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidArgument(f"params.temperature must be >= 0, got {params.temperature}")
    if not math.isfinite(params.top_p) or not 0 <= params.top_p <= 1:
        raise InvalidArgument(f"params.top_p must lie in (0, 1] (0 = off), got {params.top_p}")
    if len(params.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(
            f"params.stop has {len(params.stop)} strings; at most {MAX_STOP_STRINGS}"
        )
    for index, stop in enumerate(params.stop):
        if len(stop) > MAX_STOP_STRING_CHARS:
            raise InvalidArgument(
                f"params.stop[{index}] has {len(stop)} characters; at most {MAX_STOP_STRING_CHARS}"
            )
    if len(params.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(
            f"params.stop_token_ids has {len(params.stop_token_ids)} ids; "
            f"at most {MAX_STOP_TOKEN_IDS}"
        )
    if vocab_size is not None:
        bad_ids = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad_ids:
            raise InvalidArgument(
                f"params.stop_token_ids {bad_ids[:5]} outside vocabulary of {vocab_size}"
            )
