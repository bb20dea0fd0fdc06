"""The engine behind a server: one thread prepares requests (chat template, tokenizer), one owns the
LLMEngine, another sends responses, a watchdog keeps readiness honest. Independent of Triton: responses
leave through a ``ResponseSink``."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from pagetron.backend.core.errors import AT_CAPACITY, AtCapacityError, InvalidRequestError
from pagetron.backend.core.sampling_params import SamplingParamsError
from pagetron.backend.engine.llm_engine import LLMEngine, shorten_gil_switch_interval
from pagetron.backend.engine.output_processor import OutputKind
from pagetron.backend.engine.outputs import RequestOutput
from pagetron.backend.serving.constants import DRAIN_DONE_SUFFIX, ErrorCode
from pagetron.backend.serving.limits import prompt_cannot_fit
from pagetron.backend.serving.request_parser import ParsedRequest
from pagetron.backend.serving.responses import ResponseBuilder
from pagetron.backend.serving.step_stats import StepStats, StepStatsCollector

logger = logging.getLogger(__name__)

# NOTE: is_cancelled() is an IPC round trip to the Triton process, like a send: polled from the engine
# thread it stalled every step that swept hundreds of live requests. A thread of its own polls instead
# and queues an abort, which the engine thread handles before its next step.
CANCEL_SWEEP_INTERVAL_S = 0.1
# NOTE: a Triton response send releases the GIL while it waits on the server (~0.1 ms) and must take it
# back afterwards; while the engine thread runs Python (scheduling, input building) that takes one
# switch interval, 5 ms by default, so at hundreds of streams the output thread fell seconds behind.
# The serving process belongs to the engine, so it shortens the interval for everyone in it
# (llm_engine.shorten_gil_switch_interval).


class ResponseSink(Protocol):
    """Where one request's responses go (a Triton response sender in production)."""

    def is_cancelled(self) -> bool: ...

    def send(self, output: RequestOutput, final: bool) -> None: ...

    def send_error(self, message: str, code: str) -> None: ...  # always the final response


@dataclass
class LiveRequest:
    request_id: str
    parsed: ParsedRequest
    sink: ResponseSink
    arrival_time: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None
    num_generated: int = 0
    finished: bool = False  # the final response (or error) has been queued; nothing more may follow


def coalesce(items: Iterable[tuple[LiveRequest, object]]) -> list[tuple[LiveRequest, object]]:
    """Joins each request's queued streaming deltas into one, keeping every request's order.

    NOTE: one response per request per step is what streaming promises, but sending costs the output
    thread ~0.1 ms each (Python backend IPC): at hundreds of streams it falls behind the engine. Then
    the deltas that queued up meanwhile go out as one response each (as vLLM's output collector
    merges them), so its lag stays about one batch of sends and no token is dropped or reordered.
    An error ends its request; anything queued for it after the error is not sent.
    """
    merged: list[tuple[LiveRequest, object]] = []
    open_deltas: dict[str, int] = {}  # request id -> index in merged of its latest unfinished output
    ended: set[str] = set()
    for live, payload in items:
        if live.request_id in ended:
            continue
        index = open_deltas.get(live.request_id)
        if isinstance(payload, RequestOutput) and index is not None:
            ResponseBuilder.merge(merged[index][1], payload)
        else:
            merged.append((live, payload))
            index = len(merged) - 1
        if isinstance(payload, RequestOutput) and not payload.finished:
            open_deltas[live.request_id] = index
        else:
            open_deltas.pop(live.request_id, None)
            ended.add(live.request_id)
    return merged


class AsyncEngine:
    """Thread-safe front of an LLMEngine. Every engine call happens on the engine thread."""

    def __init__(
        self,
        engine: LLMEngine,
        stall_timeout_s: float = 30.0,
        on_step: Callable[[StepStats], None] | None = None,
        on_unhealthy: Callable[[str], None] | None = None,
        drain_file: str | None = None,
        drain_grace_s: float = 20.0,
        max_queued_requests: int | None = 1024,
    ):
        self.engine = engine
        # Backpressure: with max_num_seqs + max_queued_requests requests in flight (so at least this many
        # waiting for the engine), a new one is refused at once with UNAVAILABLE rather than queued
        # behind minutes of work. None: never refuse.
        if max_queued_requests is not None and max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0 or None; got {max_queued_requests}")
        self.max_queued_requests = max_queued_requests
        self.stall_timeout_s = stall_timeout_s
        # NOTE: Triton does not finalize a decoupled model while its streams are open, so a server stop
        # with long generations in flight would hit its exit timeout. The launcher creates drain_file
        # first: new requests are then refused, running ones get drain_grace_s to finish, the rest are
        # cancelled, and drain_file + ".done" tells the launcher it may stop the server.
        self.drain_file = drain_file
        self.drain_grace_s = drain_grace_s
        self._drain_deadline: float | None = None
        self.on_step = on_step
        self.on_unhealthy = on_unhealthy
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._live: dict[str, LiveRequest] = {}
        self._lock = threading.Lock()  # guards _live and LiveRequest.finished
        self._stop = threading.Event()
        self._last_progress = time.monotonic()
        self.unhealthy_reason: str | None = None
        self._stats = StepStatsCollector(engine)
        self._preprocess: queue.Queue = queue.Queue()
        engine.max_token_bytes  # noqa: B018 (computed once here, not by the first request)
        self._threads = [
            threading.Thread(target=self._engine_loop, name="pagetron-engine", daemon=True),
            threading.Thread(target=self._output_loop, name="pagetron-output", daemon=True),
            threading.Thread(target=self._watchdog_loop, name="pagetron-watchdog", daemon=True),
            threading.Thread(target=self._cancel_poll_loop, name="pagetron-cancel-poll", daemon=True),
            threading.Thread(target=self._preprocess_loop, name="pagetron-preprocess", daemon=True),
        ]

    # ---- called from any thread ---------------------------------------------------------------------
    def start(self) -> None:
        shorten_gil_switch_interval()
        for t in self._threads:
            t.start()

    @property
    def healthy(self) -> bool:
        return self.unhealthy_reason is None

    def submit(self, request_id: str, parsed: ParsedRequest, sink: ResponseSink) -> None:
        if not self.healthy:
            sink.send_error(f"the engine is unavailable: {self.unhealthy_reason}", ErrorCode.UNAVAILABLE)
            return
        if self._drain_deadline is not None:
            sink.send_error("the server is shutting down", ErrorCode.UNAVAILABLE)
            return
        live = LiveRequest(request_id, parsed, sink)
        with self._lock:
            limit = None
            if self.max_queued_requests is not None:
                limit = self.engine.config.max_num_seqs + self.max_queued_requests
            if limit is not None and len(self._live) >= limit:
                refused = (
                    f"{AT_CAPACITY}: {len(self._live)} requests in flight (max_num_seqs "
                    f"{self.engine.config.max_num_seqs} + max_queued_requests {self.max_queued_requests}); "
                    "retry later"
                )
            else:
                refused = None
                self._live[request_id] = live
        if refused is not None:
            sink.send_error(refused, ErrorCode.UNAVAILABLE)
            return
        self._preprocess.put(live)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def num_live_requests(self) -> int:
        with self._lock:
            return len(self._live)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the threads; requests still in flight end with an UNAVAILABLE error. An engine declared
        unhealthy gets a second: a stalled step never returns, and its thread dies with the process."""
        self._stop.set()
        self._inbox.put(("wake", None))
        self._preprocess.put(None)
        self._threads[0].join(1.0 if self.unhealthy_reason is not None else timeout)
        self._fail_all("the model is being unloaded", ErrorCode.UNAVAILABLE)
        self._outbox.put(None)
        self._threads[1].join(timeout)

    # ---- engine thread ------------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        try:
            while not self._stop.is_set() and self.healthy:
                busy = self.engine.has_unfinished_requests()
                aborted = self._drain_inbox(block=not busy)
                if self.engine.has_unfinished_requests():
                    self._step()
                elif aborted and self.on_step is not None:  # no step follows: publish the freed state
                    self.on_step(self._stats.begin())
                self._last_progress = time.monotonic()
        except BaseException as e:  # the engine is broken: nothing in flight may hang
            logger.exception("engine thread died")
            self._mark_unhealthy(f"engine thread died: {type(e).__name__}: {e}")

    def _drain_inbox(self, block: bool) -> bool:
        """Handles everything queued for the engine; True if a request was aborted."""
        try:
            item = self._inbox.get(timeout=CANCEL_SWEEP_INTERVAL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        aborted = False
        while True:
            kind, payload = item
            if kind == "add":
                self._add(payload)
            elif kind == "abort":
                self._abort(payload, "the request was cancelled", ErrorCode.CANCELLED)
                aborted = True
            elif kind == "abort_all":
                for request_id in self.engine.output_processor.request_ids():
                    self._abort(request_id, payload, ErrorCode.UNAVAILABLE)
                aborted = True
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return aborted

    def _add(self, prepared: tuple[LiveRequest, str | None, list]) -> None:
        live, text, seqs = prepared
        with self._lock:
            if live.finished:  # cancelled or refused while it was being prepared
                return
        self.engine.enqueue(live.request_id, text, seqs, OutputKind.DELTA)

    # ---- preprocessing thread -----------------------------------------------------------------------
    # NOTE: rendering a chat and tokenizing take time in proportion to the request (seconds for a few MB),
    # and on the engine thread they stalled every running stream and could trip the watchdog. Here they
    # run beside it; the engine thread only queues the finished sequences. A prompt whose byte length
    # alone proves it cannot fit is refused before it is tokenized.
    def _preprocess_loop(self) -> None:
        while (live := self._preprocess.get()) is not None:
            with self._lock:
                if live.finished:
                    continue
            try:
                self._check_size(live.parsed.prompt)
                text, seqs = self.engine.make_sequences(
                    live.request_id, live.parsed.prompt, live.parsed.params, live.arrival_time
                )
            except (InvalidRequestError, SamplingParamsError) as e:
                self._finish_with_error(live.request_id, str(e), ErrorCode.INVALID_ARG)
                continue
            except AtCapacityError as e:
                self._finish_with_error(live.request_id, str(e), ErrorCode.UNAVAILABLE)
                continue
            except Exception as e:  # noqa: BLE001 (the tokenizer or chat template refused the input)
                # NOTE: one request's input must never take a thread down with it (a lone surrogate in a
                # chat message once did, through the tokenizer). Nothing was queued yet: only it fails.
                logger.warning("request %s refused while being prepared: %r", live.request_id, e)
                message = f"the prompt could not be tokenized: {type(e).__name__}: {e}"
                self._finish_with_error(live.request_id, message, ErrorCode.INVALID_ARG)
                continue
            self._inbox.put(("add", (live, text, seqs)))

    def _check_size(self, prompt) -> None:
        if isinstance(prompt, str):
            field, size = "prompt", len(prompt.encode("utf-8", "surrogatepass"))
        elif isinstance(prompt, dict) and "messages" in prompt:
            field, messages = "messages", prompt["messages"]
            if len(messages) >= self.engine.max_model_len:  # the template gives each at least one token
                raise InvalidRequestError(
                    field, f"{len(messages)} messages cannot fit max_model_len {self.engine.max_model_len}"
                )
            size = sum(len(str(m.get("content", "")).encode("utf-8", "surrogatepass")) for m in messages)
        else:
            return
        engine = self.engine
        if prompt_cannot_fit(size, engine.max_model_len, engine.max_token_bytes):
            raise InvalidRequestError(
                field,
                f"{size} bytes of text cannot fit max_model_len {engine.max_model_len}: no token of this "
                f"model is longer than {engine.max_token_bytes} bytes (refused without tokenizing)",
            )

    def _abort(self, request_id: str, message: str, code: str) -> None:
        self.engine.abort_request(request_id)
        self._finish_with_error(request_id, message, code)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a broken engine: fail what is in flight, stop taking work
            logger.exception("engine step failed")
            reason = f"engine step failed: {type(e).__name__}: {e}"
            self._fail_all(reason, ErrorCode.INTERNAL)
            self._mark_unhealthy(reason)
            return
        now = time.monotonic()
        stats = self._stats.begin()
        with self._lock:
            for out in outputs:
                live = self._live.get(out.request_id)
                if live is None or live.finished:
                    continue
                if out.error is not None:  # refused before it ran: the client's request was at fault
                    live.finished = True
                    del self._live[out.request_id]
                    self._outbox.put((live, (out.error, ErrorCode.INVALID_ARG)))
                    continue
                live.num_generated = self._stats.observe(
                    stats,
                    out,
                    live.arrival_time,
                    live.last_token_time,
                    live.num_generated,
                    now,
                    live.parsed.params.lora_name,
                )
                live.last_token_time = now
                if out.finished:
                    live.finished = True
                    del self._live[out.request_id]
                self._outbox.put((live, out))
        if self.on_step is not None:
            self.on_step(stats)

    # ---- output thread ------------------------------------------------------------------------------
    def _output_loop(self) -> None:
        while True:
            items = [self._outbox.get()]
            while True:  # everything queued while the previous responses were being sent
                try:
                    items.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            stop = None in items
            for live, payload in coalesce(item for item in items if item is not None):
                try:
                    if isinstance(payload, RequestOutput):
                        live.sink.send(payload, final=payload.finished)
                    else:
                        message, code = payload
                        live.sink.send_error(message, code)
                except Exception:
                    logger.exception("sending a response for %s failed", live.request_id)
            if stop:
                return

    def _finish_with_error(self, request_id: str, message: str, code: str) -> None:
        with self._lock:
            live = self._live.pop(request_id, None)
            if live is None or live.finished:
                return
            live.finished = True
        self._outbox.put((live, (message, code)))

    def _fail_all(self, message: str, code: str) -> None:
        with self._lock:
            ids = list(self._live)
        for request_id in ids:
            self._finish_with_error(request_id, message, code)

    # ---- cancellation poller ------------------------------------------------------------------------
    def _cancel_poll_loop(self) -> None:
        flagged: set[str] = set()  # aborts already queued
        while not self._stop.wait(CANCEL_SWEEP_INTERVAL_S):
            with self._lock:
                live = [r for r in self._live.values() if not r.finished]
            flagged &= {r.request_id for r in live}
            for r in live:
                if r.request_id in flagged:
                    continue
                try:
                    cancelled = r.sink.is_cancelled()
                except Exception:
                    logger.exception("checking whether %s was cancelled failed", r.request_id)
                    continue
                if cancelled:
                    flagged.add(r.request_id)
                    self._inbox.put(("abort", r.request_id))

    # ---- watchdog -----------------------------------------------------------------------------------
    def _watchdog_loop(self) -> None:
        while not self._stop.wait(0.5):
            self._check_drain()
            if not self.healthy:
                continue
            if not self._threads[0].is_alive():
                self._mark_unhealthy("the engine thread is not running")
            elif (problem := self.engine.health()) is not None:  # e.g. a tensor-parallel rank died while idle
                self._mark_unhealthy(problem)
            elif self.num_live_requests() and time.monotonic() - self._last_progress > self.stall_timeout_s:
                self._mark_unhealthy(f"the engine made no progress for {self.stall_timeout_s:.0f} s")

    def _mark_unhealthy(self, reason: str) -> None:
        if self.unhealthy_reason is not None:
            return
        self.unhealthy_reason = reason
        logger.error("engine unhealthy: %s", reason)
        self._fail_all(f"the engine is unavailable: {reason}", ErrorCode.UNAVAILABLE)
        if self.on_unhealthy is not None:
            self.on_unhealthy(reason)

    def _check_drain(self) -> None:
        if self.drain_file is None or not os.path.exists(self.drain_file):
            return
        now = time.monotonic()
        if self._drain_deadline is None:
            logger.info(
                "draining: %d requests in flight get %.0f s", self.num_live_requests(), self.drain_grace_s
            )
            self._drain_deadline = now + self.drain_grace_s
        if self.num_live_requests() and now >= self._drain_deadline:
            self._inbox.put(("abort_all", "the server is shutting down"))
            self._fail_all("the server is shutting down", ErrorCode.UNAVAILABLE)
        done = self.drain_file + DRAIN_DONE_SUFFIX
        if not self.num_live_requests() and not os.path.exists(done):
            with open(done, "w") as f:
                f.write("drained\n")
