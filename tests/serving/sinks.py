"""A ResponseSink for tests of the AsyncEngine: it records what arrives and checks the sink contract.

A failure inside a callback (on the engine's output thread) would otherwise be logged and swallowed and
the test would sit out its timeout; here it is kept and re-raised by ``wait()``, so the test fails at
once with its own message.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from pagetron.backend.engine.outputs import RequestOutput


class RecordingSink:
    def __init__(
        self, on_send: Callable[[RecordingSink, RequestOutput], None] | None = None, send_s: float = 0
    ):
        self.on_send = on_send  # runs for each response, after it is recorded (may cancel, assert, ...)
        self.send_s = send_s  # how long each send takes, as a slow client would
        self.responses: list[RequestOutput] = []
        self.error: tuple[str, str] | None = None
        self.finals = 0
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.failure: BaseException | None = None

    @property
    def tokens(self) -> list[int]:
        return [t for r in self.responses for t in r.outputs[0].token_ids]

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def send(self, output: RequestOutput, final: bool) -> None:
        with self._checked():
            time.sleep(self.send_s)
            assert self.finals == 0, "a response after the final one"
            self.responses.append(output)
            if self.on_send is not None:
                self.on_send(self, output)
            if final:
                self.finals += 1
                self.done.set()

    def send_error(self, message: str, code: str) -> None:
        with self._checked():
            assert self.finals == 0, f"an error after the final response: [{code}] {message}"
            self.error = (message, code)
            self.finals += 1
            self.done.set()

    def wait(self, timeout_s: float) -> RecordingSink:
        """Until the final response or error; raises what failed inside a callback."""
        finished = self.done.wait(timeout_s)
        if self.failure is not None:
            raise self.failure
        assert finished, f"no final response within {timeout_s} s ({len(self.responses)} responses)"
        return self

    @contextlib.contextmanager
    def _checked(self):
        try:
            yield
        except BaseException as e:
            if self.failure is None:
                self.failure = e
                self.done.set()
            raise
