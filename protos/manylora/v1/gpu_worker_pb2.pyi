from manylora.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("running_requests", "waiting_requests", "free_slots", "total_slots", "resident_adapters", "adapter_cache_hits", "adapter_cache_misses", "model", "kv_slots", "adapter_slots", "adapter_evictions", "host_cached_adapters", "decode_steps", "decode_step_seconds", "prompt_steps", "prompt_step_seconds", "decode_step_wait_seconds", "prompt_step_wait_seconds", "decode_step_tokens", "prompt_step_tokens", "kernel_compiles", "kernel_compile_seconds", "decode_step_cpu_seconds", "prompt_step_cpu_seconds", "promised_slots")
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_STEPS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_STEP_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_COMPILES_FIELD_NUMBER: _ClassVar[int]
    KERNEL_COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_STEP_CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PROMISED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    running_requests: int
    waiting_requests: int
    free_slots: int
    total_slots: int
    resident_adapters: _containers.RepeatedScalarFieldContainer[str]
    adapter_cache_hits: int
    adapter_cache_misses: int
    model: str
    kv_slots: int
    adapter_slots: int
    adapter_evictions: int
    host_cached_adapters: _containers.RepeatedScalarFieldContainer[str]
    decode_steps: int
    decode_step_seconds: float
    prompt_steps: int
    prompt_step_seconds: float
    decode_step_wait_seconds: float
    prompt_step_wait_seconds: float
    decode_step_tokens: int
    prompt_step_tokens: int
    kernel_compiles: int
    kernel_compile_seconds: float
    decode_step_cpu_seconds: float
    prompt_step_cpu_seconds: float
    promised_slots: int
    def __init__(self, running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., free_slots: _Optional[int] = ..., total_slots: _Optional[int] = ..., resident_adapters: _Optional[_Iterable[str]] = ..., adapter_cache_hits: _Optional[int] = ..., adapter_cache_misses: _Optional[int] = ..., model: _Optional[str] = ..., kv_slots: _Optional[int] = ..., adapter_slots: _Optional[int] = ..., adapter_evictions: _Optional[int] = ..., host_cached_adapters: _Optional[_Iterable[str]] = ..., decode_steps: _Optional[int] = ..., decode_step_seconds: _Optional[float] = ..., prompt_steps: _Optional[int] = ..., prompt_step_seconds: _Optional[float] = ..., decode_step_wait_seconds: _Optional[float] = ..., prompt_step_wait_seconds: _Optional[float] = ..., decode_step_tokens: _Optional[int] = ..., prompt_step_tokens: _Optional[int] = ..., kernel_compiles: _Optional[int] = ..., kernel_compile_seconds: _Optional[float] = ..., decode_step_cpu_seconds: _Optional[float] = ..., prompt_step_cpu_seconds: _Optional[float] = ..., promised_slots: _Optional[int] = ...) -> None: ...
