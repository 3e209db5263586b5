"""Which adapter version a request asks for: `adapter_id` may pin one as `id@N`, and
`adapter_version` may name one; 0 (and no `@N`) means the newest."""

from __future__ import annotations

from services.common.errors import InvalidArgument


def parse_adapter_ref(adapter_id: str, adapter_version: int = 0) -> tuple[str, int]:
    """(bare id, version; 0 = newest). `id@N` with a different `adapter_version` is refused
    (InvalidArgument): neither can be assumed to be the one the caller meant."""
    if "@" not in adapter_id:
        return adapter_id, adapter_version
    bare, _, text = adapter_id.rpartition("@")
    if not bare or not text.isdigit() or int(text) == 0:
        raise InvalidArgument(
            f"adapter_id: {adapter_id!r} is not 'id' or 'id@N' with a version N >= 1"
        )
    pinned = int(text)
    if adapter_version and adapter_version != pinned:
        raise InvalidArgument(
            f"adapter_version: {adapter_version} conflicts with the version in adapter_id "
            f"{adapter_id!r}; give one of them, or the same version in both"
        )
    return bare, pinned


def adapter_ref(adapter_id: str, version: int) -> str:
    """How logs and errors name an adapter version: `id@N`, or `id` for the newest."""
    return f"{adapter_id}@{version}" if version else adapter_id
