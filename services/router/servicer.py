"""The Router gRPC service: validate, check the adapter, queue, pick a worker, relay its stream.

Nothing outlives a call: the queue slot, the worker call and the worker's share of this
router's load are all released when the stream ends, whichever way it ends.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from manylora.v1 import common_pb2, router_pb2_grpc
from services.common.adapter_ref import parse_adapter_ref
from services.common.errors import (
    FAILURE_SCOPE_KEY,
    REQUEST_FAILURE,
    WORKER_FAILURE,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ServiceError,
    Unavailable,
    error_for_status,
    status_details,
)
from services.common.logging import request_id_var
from services.common.tracing import add_event
from services.common.validation import UndecodableRequest, check_generate_request
from services.router.adapter_catalog import AdapterCatalog
from services.router.admission import Admission
from services.router.metrics import RouterMetrics
from services.router.routing import choose
from services.router.worker_pool import WorkerHandle, WorkerPool

logger = logging.getLogger(__name__)

# A worker is tried at most this often per request, and only before its first token.
MAX_ATTEMPTS = 2
# Codes of a worker call that mean the worker (or the way to it) failed, not the request,
# when the worker did not say (a call that failed on the way has no failure scope).
WORKER_FAILED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}


def time_left(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds to the client's deadline (None: no deadline); passed on to the worker."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    if remaining <= 0:
        raise DeadlineExceeded("deadline passed at the router")
    return float(remaining)


def failure_scope(exc: grpc.aio.AioRpcError) -> str | None:
    """Whose failure a worker said this was (errors.FAILURE_SCOPE_KEY); None when it said
    nothing (the call failed on the way, or the worker predates the marker)."""
    for key, value in exc.trailing_metadata() or ():
        if key == FAILURE_SCOPE_KEY:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


async def abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> NoReturn:
    await context.abort(exc.code, status_details(str(exc)))
    raise AssertionError("context.abort returned")  # it raises; this tells the type checker


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        pool: WorkerPool,
        admission: Admission,
        catalog: AdapterCatalog | None,
        metrics: RouterMetrics,
        load_bound: float,
        min_load_bound: int,
    ):
        self._pool = pool
        self._admission = admission
        self._catalog = catalog
        self._metrics = metrics
        self._load_bound = load_bound
        self._min_load_bound = min_load_bound

    async def Generate(
        self,
        request: common_pb2.GenerateRequest | UndecodableRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        # One flat loop per message: each async generator layer between the worker's
        # stream and the client's would cost every relayed message a resumption.
        summary = self._metrics.track()
        try:
            forward = self._checked(request)
            summary.describe(forward)
            await self._admit(forward, context)
            try:
                tried: list[str] = []
                while True:
                    handle = self._pick(forward, tried)
                    tried.append(handle.address)
                    sent = 0
                    call = handle.stub.Generate(forward, timeout=time_left(context))
                    handle.in_flight += 1
                    try:
                        finished = False
                        while (response := await call.read()) is not grpc.aio.EOF:
                            finished = (
                                response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                            )
                            sent += 1
                            yield summary.on_response(response)
                        if not finished:
                            raise Unavailable(
                                f"worker {handle.address} ended the stream before its last message"
                            )
                        break
                    except grpc.aio.AioRpcError as exc:
                        error = self._failure(handle, exc, sent, len(tried) < MAX_ATTEMPTS)
                        if error is not None:
                            raise error from None
                    finally:
                        handle.in_flight -= 1
                        if not call.done():  # our client went away: the worker's request goes too
                            call.cancel()
                    self._metrics.retries.inc()
            finally:
                self._admission.release()
            logger.info("finished")
        except ServiceError as exc:
            logger.info("ended with %s: %s", exc.code.name, exc)
            summary.fail(exc.code)
            await abort(context, exc)
        except Exception:
            logger.exception("failed")
            summary.fail(grpc.StatusCode.INTERNAL)
            await abort(context, Internal("internal router error"))
        finally:
            summary.close()

    @staticmethod
    def _checked(
        request: common_pb2.GenerateRequest | UndecodableRequest,
    ) -> common_pb2.GenerateRequest:
        """The request to forward, after the router's one check of every field. The caller's
        request_id is only echoed and logged: nothing is keyed by it, here or at the worker."""
        if isinstance(request, UndecodableRequest):
            raise InvalidArgument(request.reason)
        check_generate_request(request)
        forward = common_pb2.GenerateRequest()
        forward.CopyFrom(request)
        forward.request_id = request.request_id or uuid.uuid4().hex
        request_id_var.set(forward.request_id)
        return forward

    async def _admit(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Check the adapter with the store, then wait for a running slot (pair with
        `self._admission.release()`)."""
        # Sent on as a bare id and a version, so that routing sees the id's affinity.
        request.adapter_id, request.adapter_version = parse_adapter_ref(
            request.adapter_id, request.adapter_version
        )
        if request.adapter_id and self._catalog is not None:
            await self._catalog.check(request.adapter_id, request.adapter_version)
        try:
            async with asyncio.timeout(time_left(context)):
                waited = await self._admission.acquire()
        except TimeoutError:
            raise DeadlineExceeded("deadline passed while queued at the router") from None
        self._metrics.generation.queue_time.observe(waited)
        add_event("admitted", queue_wait_s=waited)

    def _pick(self, request: common_pb2.GenerateRequest, tried: list[str]) -> WorkerHandle:
        handles = {h.address: h for h in self._pool.eligible() if h.address not in tried}
        candidates = [h.candidate() for h in handles.values()]
        choice = choose(
            request.adapter_id,
            request.request_id,
            candidates,
            self._load_bound,
            self._min_load_bound,
        )
        if choice is None:
            where = "left to retry on" if tried else "available"
            raise Unavailable(f"no healthy worker {where}; retry later")
        self._metrics.routed.labels(choice.affinity if request.adapter_id else "base").inc()
        add_event("routed", worker=choice.address, affinity=choice.affinity)
        logger.info(
            "routed to %s (adapter %r, affinity %s)",
            choice.address,
            request.adapter_id,
            choice.affinity,
        )
        return handles[choice.address]

    def _failure(
        self, handle: WorkerHandle, exc: grpc.aio.AioRpcError, sent: int, can_retry: bool
    ) -> ServiceError | None:
        """The error for the client, or None to try another worker."""
        code, details = exc.code(), status_details(exc.details() or "")
        scope = failure_scope(exc)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and sent == 0 and can_retry:
            logger.warning("worker %s is full (%s); trying another", handle.address, details)
            return None
        if scope == REQUEST_FAILURE:  # this request failed, not the worker: pass it on
            return error_for_status(code, details or code.name)
        failed = scope == WORKER_FAILURE or code in WORKER_FAILED
        if failed:
            self._pool.mark_failed(handle, f"Generate failed: {code.name}: {details}")
        if sent == 0 and can_retry and failed:
            logger.warning(
                "worker %s: %s before the first token (%s); trying another",
                handle.address,
                code.name,
                details,
            )
            return None
        if failed and sent:
            return Unavailable(
                f"worker {handle.address} failed mid-stream after {sent} messages "
                f"({code.name}: {details}); the output is incomplete, retry the request"
            )
        if failed:
            return Unavailable(f"worker {handle.address} failed ({code.name}: {details})")
        return error_for_status(code, details or code.name)

    async def ListAdapters(
        self,
        request: common_pb2.ListAdaptersRequest | UndecodableRequest,
        context: grpc.aio.ServicerContext,
    ) -> common_pb2.ListAdaptersResponse:
        request_id_var.set(uuid.uuid4().hex)
        if isinstance(request, UndecodableRequest):
            await abort(context, InvalidArgument(request.reason))
        if self._catalog is None:
            await abort(
                context,
                FailedPrecondition("this router has no adapter store configured (--adapter-store)"),
            )
        try:
            return await self._catalog.list(request)
        except ServiceError as exc:
            await abort(context, exc)
