"""The engine's own process (`--engine-process`): builds the engine, runs its loop, and talks
to the worker's gRPC process over one pipe (the messages: engine_process.py).

One thread does the work: between steps, the engine thread (engine_loop.py) takes in what
the pipe holds (requests, adapters, aborts) and, after each step, sends that step's outputs
back in one message. It shares the GIL with no other busy thread: not with the gRPC server,
and not with a reader of the pipe, which would wait up to the interpreter's switch interval
(5 ms) for the GIL at every wake-up while the engine thread runs Python, delaying requests.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from kernels.compile_watch import compile_watch
from services.common.errors import Internal, ServiceError
from services.common.logging import setup_logging
from services.common.lora_format import AdapterKey, CanonicalAdapter
from services.common.thread_profile import ThreadProfile
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.engine_loop import EngineLoop
from services.gpu_worker.engine.sequence import FinishReason, Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import Tokenizer
from services.gpu_worker.serving import adapter_handoff
from services.gpu_worker.serving.config import WorkerConfig
from services.gpu_worker.serving.engine_messages import EngineInfo, Submit

logger = logging.getLogger(__name__)

# Stats go back at most this often while steps run (each step's outputs go at once); the
# gRPC process only needs them for the waiting-queue bound and GetStats.
STATS_INTERVAL_S = 0.02


def main(config: WorkerConfig, conn: Connection) -> None:
    """The process's entry (multiprocessing, spawned)."""
    # Ctrl-C in a terminal reaches the whole process group, this process too: the gRPC
    # process drains its streams first, then stops this one over the pipe, and this one exits
    # by itself once the gRPC process is gone. (SIGTERM still ends it: multiprocessing sends
    # it to a daemonic child at exit.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(config.log_level, config.log_format)
    # Imported here: server.py imports this module (through engine_process.py).
    from services.gpu_worker.serving.server import build_worker_engine, thread_profiles

    try:
        engine, tokenizer = build_worker_engine(config)
    except BaseException as exc:
        logger.exception("building the engine failed")
        conn.send(("failed", f"building the engine failed: {type(exc).__name__}: {exc}"))
        return
    engine_profile, _ = thread_profiles(config.profile_to)  # the loop's is the gRPC process's
    EngineChild(engine, tokenizer, conn, engine_profile).serve()


class EngineChild:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        conn: Connection,
        profile: ThreadProfile | None = None,
    ):
        self._engine = engine
        self._tokenizer = tokenizer
        self._conn = conn
        self._loop = EngineLoop(
            engine, profile, after_publish=self._send_outputs, receive=self._receive
        )
        self._adapters: dict[AdapterKey, CanonicalAdapter] = {}
        self._seqs: dict[int, Sequence] = {}  # by the gRPC process's seq_id
        # Written on the engine thread only:
        self._outbox: list[tuple[int, StepOutput]] = []
        self._refused = 0
        self._stats_sent_at = 0.0

    def serve(self) -> None:
        """Announce the engine, then serve the pipe until told to stop or it closes."""
        engine = self._engine
        info = EngineInfo(
            engine.limits,
            str(engine.dtype).removeprefix("torch."),
            engine.model_config.shape,
            engine.config.max_waiting,
            engine.stats(),
        )
        self._conn.send(("ready", info))
        compile_watch().warn = True  # from here on a compilation stalls served requests
        self._loop.start()
        self._loop.join()

    def _receive(self, timeout: float) -> None:
        """On the engine thread: every batch of messages the pipe holds, waiting up to
        `timeout` seconds for the first."""
        try:
            if not self._conn.poll(timeout):
                return
            while True:
                for message in self._conn.recv():
                    if message[0] == "stop":
                        self._loop.request_stop()
                        return
                    try:
                        self._handle(message)
                    except Exception:  # one bad message must not end everyone's requests
                        logger.exception("handling a %r message failed", message[0])
                if not self._conn.poll(0):
                    return
        except (EOFError, OSError):
            logger.warning("the worker's gRPC process went away; the engine stops")
            self._loop.request_stop()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "submit":
            self._submit(message[1])
        elif kind == "abort":
            seq = self._seqs.get(message[1])
            if seq is not None:
                self._loop.abort(seq)
        elif kind in ("adapter", "adapter_file"):
            key, payload = message[1], message[2]
            if kind == "adapter_file":
                adapter = adapter_handoff.take(payload)
            else:
                adapter = CanonicalAdapter.from_bytes(payload)
            adapter.version, adapter.sha256 = key.version, key.sha256
            self._adapters[key] = adapter
        elif kind == "forget":
            self._adapters.pop(message[1], None)
        else:
            logger.error("unknown message %r from the gRPC process", kind)

    def _submit(self, submit: Submit) -> None:
        seq_id = submit.seq_id
        adapter = self._adapters.get(submit.adapter) if submit.adapter is not None else None
        seq = Sequence(
            request_id=submit.request_id,
            prompt_ids=submit.prompt_ids,
            options=submit.options,
            tokenizer=self._tokenizer,
            on_output=lambda out: self._queue_output(seq_id, out),
            adapter=adapter,
            deadline=submit.deadline,
            arrival=submit.arrival,
        )
        self._seqs[seq_id] = seq
        error: ServiceError | None = None
        if submit.adapter is not None and adapter is None:  # never on the base model instead
            logger.error("request %s: adapter %s was never sent here", seq_id, submit.adapter)
            error = Internal("the engine process lacks the request's adapter")
        else:
            try:
                self._loop.submit(seq)
            except ServiceError as exc:  # what the engine alone can tell (the pool's size)
                error = exc
        if error is not None:
            refused = error
            self._loop.call(lambda: self._refuse(seq, refused))

    def _refuse(self, seq: Sequence, error: ServiceError) -> None:
        self._refused += 1
        out = seq.output([], "", [], FinishReason.ABORTED)
        out.error = error
        seq.on_output(out)

    def _queue_output(self, seq_id: int, out: StepOutput) -> None:
        """On the engine thread: the output joins this step's message."""
        if out.error is not None and not isinstance(out.error, ServiceError):
            out.error = Internal(f"request failed: {type(out.error).__name__}")
        if out.finish_reason is not None or out.error is not None:
            self._seqs.pop(seq_id, None)
        self._outbox.append((seq_id, out))

    def _send_outputs(self) -> None:
        """After each step, on the engine thread: its outputs, and the stats when due."""
        now = time.monotonic()
        idle = not self._engine.has_work()  # the last outputs of a burst carry fresh stats
        stats_due = idle or now - self._stats_sent_at >= STATS_INTERVAL_S
        if not self._outbox and not stats_due:
            return
        outputs, self._outbox = self._outbox, []
        stats = None
        if stats_due:
            # Requests the engine has taken in or refused: the waiting-queue bound's count.
            stats = (self._loop.stats, self._loop.added_total + self._refused)
            self._stats_sent_at = now
        try:
            self._conn.send(("outputs", outputs, stats))
        except OSError:  # the gRPC process is gone: nobody is left to serve
            logger.warning("the worker's gRPC process went away; the engine process exits")
            os._exit(1)
