"""Every caller-supplied field of a GenerateRequest, checked and bounded in one place.

The router and the worker each call `check_generate_request` once, at their gRPC boundary
(the worker adds the checks that need its vocabulary). Nothing a caller sends is echoed,
logged or used as a key before it has passed these bounds, and error messages quote caller
input only through `excerpt`, so that a status never nears gRPC's metadata limits.
No torch here: the router imports it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message, message_factory

from manylora.v1 import common_pb2
from services.common.chat_messages import check_chat
from services.common.errors import InvalidArgument
from services.common.ids import MAX_ADAPTER_ID_LENGTH, adapter_id_problem
from services.common.sampling_params import check_sampling_params

# Request ids travel as gRPC metadata (x-request-id) and on every log line: printable ASCII.
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID_RE = re.compile(r"[ -~]*")
# The store's id, and "@N" with a version of at most 20 digits (a uint64).
MAX_ADAPTER_ID_CHARS = MAX_ADAPTER_ID_LENGTH + 21
# Far above any context length served; a prompt beyond it could only cost tokenizer time.
MAX_PROMPT_CHARS = 1 << 20
MAX_PROMPT_TOKEN_IDS = 1 << 17
# Longest caller input quoted in an error message or a log line.
MAX_EXCERPT_CHARS = 40


def excerpt(value: str | bytes, limit: int = MAX_EXCERPT_CHARS) -> str:
    """repr of caller input, cut to `limit` characters with the full length named."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} chars)"


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            f"request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
        )
    if not _REQUEST_ID_RE.fullmatch(request_id):
        raise InvalidArgument(
            f"request_id {excerpt(request_id)} must be printable ASCII (it is sent as metadata)"
        )


def check_adapter_id(adapter_id: str) -> None:
    """Empty (the base model), a valid store id, or one pinned to a version as `id@N` (the
    version itself is parse_adapter_ref's check)."""
    if len(adapter_id) > MAX_ADAPTER_ID_CHARS:
        raise InvalidArgument(
            f"adapter_id has {len(adapter_id)} characters; at most {MAX_ADAPTER_ID_CHARS}"
        )
    bare = adapter_id.rpartition("@")[0] if "@" in adapter_id else adapter_id
    problem = adapter_id_problem(bare) if adapter_id else None
    if problem is not None:
        raise InvalidArgument(problem)


def check_input(request: common_pb2.GenerateRequest) -> None:
    """The prompt (text, token ids or chat) is there, not empty and bounded (its length
    against the model is the worker's check)."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("one of prompt, prompt_token_ids or chat is required")
    if kind == "chat":
        check_chat(request.chat)
        return
    if kind == "prompt":
        size = len(request.prompt)
        limit, what = MAX_PROMPT_CHARS, "characters"
    else:
        size = len(request.prompt_token_ids.ids)
        limit, what = MAX_PROMPT_TOKEN_IDS, "token ids"
    if size == 0:
        raise InvalidArgument("prompt is empty")
    if size > limit:
        raise InvalidArgument(f"prompt has {size} {what}; at most {limit}")


def check_generate_request(
    request: common_pb2.GenerateRequest, vocab_size: int | None = None
) -> None:
    """Raise InvalidArgument naming the first bad field; stop token ids only with a
    vocabulary (prompt token ids and lengths are the engine's `check`, against its model)."""
    check_request_id(request.request_id)
    check_adapter_id(request.adapter_id)
    check_input(request)
    check_sampling_params(request.params, vocab_size)


class UndecodableRequest:
    """Stands in for a request whose bytes did not parse, so that the servicer (not grpcio,
    which would answer UNKNOWN) refuses it with INVALID_ARGUMENT and this reason."""

    def __init__(self, reason: str):
        self.reason = reason


def lenient_deserializer(
    deserialize: Callable[[bytes], Any],
) -> Callable[[bytes], Any]:
    """`deserialize`, returning an UndecodableRequest instead of raising on bad bytes."""
    message_class = getattr(deserialize, "__self__", None)
    full_name = getattr(getattr(message_class, "DESCRIPTOR", None), "full_name", "")

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except message.DecodeError:
            return UndecodableRequest(undecodable_reason(full_name, data))

    return decode


def undecodable_reason(full_name: str, data: bytes) -> str:
    """Which string field is not UTF-8 (proto3 strings must be), or that the bytes are not
    a message of this type at all."""
    lenient = _bytes_for_strings_class(full_name) if full_name else None
    if lenient is not None:
        try:
            parsed = lenient.FromString(data)
        except message.DecodeError:
            parsed = None
        if parsed is not None:
            field = _first_non_utf8_field(parsed, "")
            if field:
                return f"{field} is not valid UTF-8 (proto3 string fields must be)"
    return f"the request is not a valid {full_name or 'message'} ({len(data)} bytes)"


@functools.lru_cache(maxsize=8)
def _bytes_for_strings_class(full_name: str) -> type[message.Message] | None:
    """A class with the wire format of `full_name` whose string fields are bytes, so that
    bytes that are not UTF-8 still parse and can be found."""
    try:
        original = descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        return None
    pool = descriptor_pool.DescriptorPool()
    _add_file(pool, original.file, set())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


def _add_file(pool: descriptor_pool.DescriptorPool, file: Any, added: set[str]) -> None:
    if file.name in added:
        return
    added.add(file.name)
    for dependency in file.dependencies:
        _add_file(pool, dependency, added)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    for message_proto in proto.message_type:
        _strings_to_bytes(message_proto)
    pool.Add(proto)


def _strings_to_bytes(message_proto: descriptor_pb2.DescriptorProto) -> None:
    for field in message_proto.field:
        if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    for nested in message_proto.nested_type:
        _strings_to_bytes(nested)


def _first_non_utf8_field(parsed: message.Message, prefix: str) -> str:
    for field, value in parsed.ListFields():
        name = f"{prefix}{field.name}"
        if field.type == descriptor.FieldDescriptor.TYPE_BYTES:
            values = value if _is_repeated(field) else [value]
            for index, item in enumerate(values):
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{name}[{index}]" if _is_repeated(field) else name
        elif field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            for item in value if _is_repeated(field) else [value]:
                found = _first_non_utf8_field(item, f"{name}.")
                if found:
                    return found
    return ""


def _is_repeated(field: descriptor.FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def add_servicer_leniently(add: Callable[[Any, Any], None], servicer: Any, server: Any) -> None:
    """Register `servicer` through its generated `add_..._to_server`, with every request
    deserializer made lenient: undecodable requests reach the servicer as UndecodableRequest."""

    registered: list[str] = []

    class Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass  # the registered handlers below are re-added as a generic handler

        def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
            registered.append(service)
            lenient = {
                name: handler._replace(
                    request_deserializer=lenient_deserializer(handler.request_deserializer)
                )
                for name, handler in handlers.items()
            }
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, lenient),)
            )
            server.add_registered_method_handlers(service, lenient)

    add(servicer, Capture())
    if not registered:  # generated code of another grpcio-tools: nothing would be served
        raise RuntimeError(f"{add.__name__} registered no method handlers")
