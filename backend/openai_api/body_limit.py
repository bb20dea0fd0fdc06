"""Limits on request bodies, as ASGI middleware in front of every route; the middleware buffers nothing.

- One body: larger than ``max_bytes`` gets OpenAI's 413 before it is read. A declared Content-Length
  over the limit is refused from the headers alone (the body is never received; a client that sent
  ``Expect: 100-continue`` never sends it); a body without one (chunked) is counted as it streams in
  and refused the moment the count passes the limit, so the frontend never holds more than the limit
  plus one read (uvicorn stops reading a socket past 64 KiB buffered).
- All bodies together: a request holds its body's bytes (declared up front, else as they arrive) from
  its start to the end of its response, out of ``max_bytes_in_flight``; one that does not fit gets 429
  (``server_at_capacity``, before its body is read when it has a Content-Length). The Python objects
  parsed from a body outweigh it many times over (measured: up to ~17x for a list of token ids, ~12x
  for a chat of empty messages), so this, not the one-body limit, is what bounds the frontend's memory
  under a flood of bodies just under the limit.

Both refusals close the connection (``Connection: close``), so the rest of the body is not read at all.
Starlette has RequestBodyLimitMiddleware, but its 413 is plain text, not OpenAI's error shape.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagetron.backend.openai_api.errors import OpenAIError

TOO_LARGE_CODE = "request_too_large"
AT_CAPACITY_CODE = "server_at_capacity"
_CLOSE = {"connection": "close"}


class BodyRefused(HTTPException):
    """Raised by the counting ``receive`` once a streamed body passes a limit. An HTTPException, so
    FastAPI's body reader passes it on (any other error there becomes a 400) to the app's handler for
    it, which answers ``exc.error`` (see ``refusal``)."""

    def __init__(self, error: OpenAIError) -> None:
        super().__init__(error.status, error.message, headers=_CLOSE)
        self.error = error


def too_large(limit: int) -> OpenAIError:
    message = f"the request body is larger than this server's limit of {limit} bytes (--max-request-bytes)"
    return OpenAIError(413, message, code=TOO_LARGE_CODE)


def over_budget(budget: int) -> OpenAIError:
    message = (
        f"the server is busy: the bodies of the requests it is handling would pass {budget} bytes "
        "(--max-request-bytes-in-flight); retry later"
    )
    return OpenAIError(429, message, code=AT_CAPACITY_CODE)


def refusal(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=_CLOSE)


class LimitRequestBodies:
    def __init__(self, app: ASGIApp, max_bytes: int, max_bytes_in_flight: int) -> None:
        if max_bytes_in_flight < max_bytes:
            raise ValueError(f"max_bytes_in_flight {max_bytes_in_flight} < max_bytes {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes
        self.budget = max_bytes_in_flight
        self.in_flight = 0  # bytes held by the requests being handled (one event loop: no lock)

    def _take(self, n: int) -> bool:
        if self.in_flight + n > self.budget:
            return False
        self.in_flight += n
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await refusal(too_large(self.max_bytes))(scope, receive, send)  # never calls receive
            return
        held = declared or 0
        if not self._take(held):
            await refusal(over_budget(self.budget))(scope, receive, send)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received, held
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                received += size
                if received > self.max_bytes:
                    raise BodyRefused(too_large(self.max_bytes))
                if received > held:  # no Content-Length: held as it arrives
                    if not self._take(received - held):
                        raise BodyRefused(over_budget(self.budget))
                    held = received
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyRefused as e:  # read outside the routes' handlers (none does now): answer here
            if started:
                raise
            await refusal(e.error)(scope, receive, send)
        finally:
            self.in_flight -= held


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # the HTTP server refuses a malformed one before the app sees it
                return None
    return None
