"""The GpuWorker gRPC service: turns Generate calls into engine requests and streams tokens."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import NoReturn

import grpc

from manylora.v1 import common_pb2, gpu_worker_pb2, gpu_worker_pb2_grpc
from services.common.adapter_ref import parse_adapter_ref
from services.common.errors import Internal, InvalidArgument, ServiceError, status_details
from services.common.logging import request_id_var
from services.common.metrics import StreamTracker
from services.common.tracing import record_engine_phases
from services.common.validation import UndecodableRequest, check_generate_request
from services.gpu_worker.adapters.adapter_source import AdapterSource
from services.gpu_worker.engine.chat_template import chat_template_for
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import FinishReason, Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import Tokenizer
from services.gpu_worker.serving.engine_handle import EngineHandle
from services.gpu_worker.serving.metrics import WorkerMetrics
from services.gpu_worker.serving.output_relay import HeldOutputs, OutputRelay, merge_outputs

logger = logging.getLogger(__name__)

# Prompts longer than this are tokenized on a thread, so that other streams keep flowing.
LONG_PROMPT_CHARS = 16384

_FINISH_REASONS = {
    FinishReason.LENGTH: common_pb2.LENGTH,
    FinishReason.STOP: common_pb2.STOP,
    FinishReason.EOS: common_pb2.EOS,
    FinishReason.ABORTED: common_pb2.ABORTED,
}


def to_proto(out: StepOutput) -> common_pb2.GenerateResponse:
    response = common_pb2.GenerateResponse(
        request_id=out.request_id, token_ids=out.token_ids, text=out.text, logprobs=out.logprobs
    )
    if out.finish_reason is not None:
        response.finish_reason = _FINISH_REASONS[out.finish_reason]
        response.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                queue_time_ms=out.queue_time_ms,
                time_to_first_token_ms=out.time_to_first_token_ms,
            )
        )
    return response


def _as_service_error(error: Exception) -> ServiceError:
    if isinstance(error, ServiceError):
        return error
    return Internal(f"request failed: {type(error).__name__}")


async def _fail(
    context: grpc.aio.ServicerContext, tracker: StreamTracker, error: ServiceError
) -> NoReturn:
    """End the call with `error`'s status, bounded details, and whose failure it is."""
    tracker.fail(error.code)
    await context.abort(
        error.code, status_details(str(error)), trailing_metadata=error.failure_scope()
    )
    raise AssertionError("context.abort returned")  # it raises; this tells the type checker


async def _next_outputs(outputs: asyncio.Queue[StepOutput]) -> list[StepOutput]:
    """The next output and every one queued behind it, up to the request's last."""
    outs = [await outputs.get()]
    while outs[-1].finish_reason is None and outs[-1].error is None and not outputs.empty():
        outs.append(outputs.get_nowait())
    return outs


class GpuWorkerServicer(gpu_worker_pb2_grpc.GpuWorkerServicer):
    def __init__(
        self,
        engine: EngineHandle,
        tokenizer: Tokenizer,
        adapters: AdapterSource,
        model_name: str,
        metrics: WorkerMetrics | None = None,
        stream_interval: int = 1,
    ):
        """`stream_interval`: tokens a stream's message waits for (services.gpu_worker
        .serving.output_relay.HeldOutputs); 1 sends each step's tokens at once."""
        self.metrics = metrics or WorkerMetrics()
        self._stream_interval = stream_interval
        self._engine = engine
        self._tokenizer = tokenizer
        self._chat_template = chat_template_for(tokenizer)
        self._adapters = adapters
        self._model_name = model_name
        self._relay: OutputRelay | None = None

    async def Generate(
        self,
        request: common_pb2.GenerateRequest | UndecodableRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue()
        tracker = self.metrics.track()
        try:
            seq = await self._accept(request, outputs, context)
        except ServiceError as exc:
            logger.info("refused: %s", exc)
            await _fail(context, tracker, exc)
        logger.info("accepted: adapter=%r prompt_tokens=%d", seq.adapter_id, len(seq.prompt_ids))
        finished = False
        try:
            while not finished:
                outs = await _next_outputs(outputs)
                failure = outs.pop().error if outs[-1].error is not None else None
                if outs:  # tokens that came before a failure still go out
                    out = merge_outputs(outs)
                    finished = out.finish_reason is not None
                    response = to_proto(out)
                    response.adapter_version = seq.adapter.version if seq.adapter else 0
                    yield tracker.on_response(response)
                if failure is not None:
                    finished = True  # the engine has let go of it already
                    logger.info("failed: %s", failure)
                    await _fail(context, tracker, _as_service_error(failure))
            logger.info("finished")
        finally:
            tracker.close()
            record_engine_phases(seq.arrival, seq.scheduled_at, seq.first_token_at)
            if not finished:  # the client went away or the call was cancelled
                logger.info("cancelled by client; aborting")
                self._engine.abort(seq)

    async def _accept(
        self,
        request: common_pb2.GenerateRequest | UndecodableRequest,
        outputs: asyncio.Queue[StepOutput],
        context: grpc.aio.ServicerContext,
    ) -> Sequence:
        """Check the request once, build its sequence and hand it to the engine."""
        if isinstance(request, UndecodableRequest):
            raise InvalidArgument(request.reason)
        check_generate_request(request, self._tokenizer.vocab_size)
        request_id_var.set(request.request_id or uuid.uuid4().hex)
        try:
            seq = await self._make_sequence(request, request_id_var.get(), outputs)
        except ServiceError:
            raise
        except Exception as exc:  # e.g. a tokenizer or adapter source bug: this request's
            logger.exception("preparing the request failed")
            raise Internal(f"preparing the request failed: {type(exc).__name__}") from exc
        remaining = context.time_remaining()
        if remaining is not None:  # lets the scheduler drop it unstarted once it is too late
            seq.deadline = time.monotonic() + remaining
        self._engine.submit(seq)
        return seq

    async def _make_sequence(
        self,
        request: common_pb2.GenerateRequest,
        request_id: str,
        outputs: asyncio.Queue[StepOutput],
    ) -> Sequence:
        options = SamplingOptions.from_proto(request.params)
        kind = request.WhichOneof("input")
        if kind == "prompt_token_ids":
            prompt = list(request.prompt_token_ids.ids)
        elif kind == "chat":
            prompt = await self._encode_chat(request.chat)
        elif len(request.prompt) > LONG_PROMPT_CHARS:  # keep the event loop free meanwhile
            prompt = await asyncio.to_thread(self._tokenizer.encode, request.prompt)
        else:
            prompt = self._tokenizer.encode(request.prompt)
        adapter_id, version = parse_adapter_ref(request.adapter_id, request.adapter_version)
        adapter = await self._adapters.get(adapter_id, version) if adapter_id else None
        if self._relay is None:  # the first call: now the servicer knows its event loop
            self._relay = OutputRelay(asyncio.get_running_loop())
        held = HeldOutputs(self._relay, outputs, self._stream_interval)
        return Sequence(
            request_id=request_id,
            prompt_ids=prompt,
            options=options,
            tokenizer=self._tokenizer,
            on_output=held.deliver,  # called on the engine thread
            adapter=adapter,
        )

    async def _encode_chat(self, chat: common_pb2.ChatPrompt) -> list[int]:
        """The conversation rendered with the model's chat template, then tokenized."""
        chars = sum(len(m.content) for m in chat.messages)
        encode = self._chat_template.encode
        if chars > LONG_PROMPT_CHARS:  # keep the event loop free meanwhile
            return await asyncio.to_thread(encode, self._tokenizer, chat.messages)
        return encode(self._tokenizer, chat.messages)

    async def GetStats(
        self, request: gpu_worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.GetStatsResponse:
        stats = self.stats()
        self.metrics.observe_stats(stats)
        return stats

    def stats(self) -> gpu_worker_pb2.GetStatsResponse:
        """Load, memory and adapter numbers: the engine thread's last snapshot (never its live
        structures) and the host cache's adapters."""
        engine = self._engine.stats
        pool = engine.pool
        return gpu_worker_pb2.GetStatsResponse(
            running_requests=engine.running_requests,
            waiting_requests=engine.waiting_requests,
            free_slots=pool.free_slots,
            total_slots=pool.total_slots,
            kv_slots=pool.kv_slots,
            adapter_slots=pool.adapter_slots,
            promised_slots=pool.promised_slots,
            resident_adapters=engine.resident_adapters,
            host_cached_adapters=self._adapters.cached_ids(),
            adapter_cache_hits=engine.adapter_cache_hits,
            adapter_cache_misses=engine.adapter_cache_misses,
            adapter_evictions=engine.adapter_evictions,
            model=self._model_name,
            **asdict(engine.steps),
        )
