"""The parts of a gRPC method path ("/package.Service/Method"), as interceptors see it."""

from __future__ import annotations


def split_method(method: str) -> tuple[str, str]:
    """("package.Service", "Method") of a full method path."""
    service, _, name = method.strip("/").partition("/")
    return service, name
