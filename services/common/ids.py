"""The one rule for adapter ids, shared by every service that accepts one.

Ids name folders on disk and parts of Redis keys, so the whole id must match: letters, digits,
'.', '_' and '-', 1 to 128 of them, not starting with '.' (which would allow '..' and collide
with the store's hidden folders). `fullmatch` on purpose: `$` also matches before a trailing
newline, which once let "a\\n" through.
"""

from __future__ import annotations

import re

MAX_ADAPTER_ID_LENGTH = 128
_ADAPTER_ID_RE = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_ADAPTER_ID_LENGTH - 1}}}")
ADAPTER_ID_RULE = (
    f"1-{MAX_ADAPTER_ID_LENGTH} letters, digits, '.', '_' or '-', not starting with '.'"
)


def is_valid_adapter_id(adapter_id: str) -> bool:
    return _ADAPTER_ID_RE.fullmatch(adapter_id) is not None


def adapter_id_problem(adapter_id: str) -> str | None:
    """None for a valid id; else one line saying why not (the id shortened, repr-quoted)."""
    if is_valid_adapter_id(adapter_id):
        return None
    shown = adapter_id if len(adapter_id) <= 40 else adapter_id[:40] + "..."
    return (
        f"adapter_id: {shown!r} ({len(adapter_id)} characters) is not valid; use {ADAPTER_ID_RULE}"
    )
