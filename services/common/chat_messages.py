"""Bounds of a chat prompt (`GenerateRequest.chat`), checked by the router and the worker at
their boundaries, as every other field is: roles from a short list, a bounded number of
messages, and their text bounded together as a text prompt is. No torch here: the router
imports it."""

from __future__ import annotations

from manylora.v1 import common_pb2
from services.common.errors import InvalidArgument

# Roles every chat template understands; others (tools, functions) need fields this contract
# does not carry, so they are refused rather than rendered wrongly.
CHAT_ROLES = ("system", "user", "assistant")
# Far beyond any conversation a context holds; rendering costs per message.
MAX_CHAT_MESSAGES = 1024
# The same bound as a text prompt's, over all contents together.
MAX_CHAT_CHARS = 1 << 20
# Longest role quoted back in an error message.
_ROLE_EXCERPT_CHARS = 20


def check_chat(chat: common_pb2.ChatPrompt) -> None:
    """Raise InvalidArgument naming the first bad message."""
    count = len(chat.messages)
    if count == 0:
        raise InvalidArgument("chat.messages is empty; give at least one message")
    if count > MAX_CHAT_MESSAGES:
        raise InvalidArgument(f"chat.messages has {count} messages; at most {MAX_CHAT_MESSAGES}")
    total = 0
    for index, message in enumerate(chat.messages):
        if message.role not in CHAT_ROLES:
            role = message.role
            shown = repr(role) if len(role) <= _ROLE_EXCERPT_CHARS else repr(role[:20]) + "..."
            raise InvalidArgument(
                f"chat.messages[{index}].role {shown} is not one of {', '.join(CHAT_ROLES)}"
            )
        total += len(message.content)
    if total > MAX_CHAT_CHARS:
        raise InvalidArgument(
            f"chat.messages have {total} characters of content together; at most {MAX_CHAT_CHARS}"
        )
