"""Client disconnects cancel the work done for them: the Triton stream behind a request is cancelled (and
the engine frees its KV blocks) as soon as the HTTP client goes away, streaming or not.

NOTE: Starlette's StreamingResponse only notices a disconnect when a write fails (ASGI spec >= 2.4, as
uvicorn speaks), which may be long after the client left: during prefill, or while the request waits
in the engine's queue. Both helpers here listen for the ASGI ``http.disconnect`` message instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``await work``, cancelled (raising ClientDisconnected) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response over an async iterator of ready-encoded events, closed (so its
    cleanup cancels the Triton stream) when the client disconnects."""

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__(events, headers={"cache-control": "no-cache"}, media_type="text/event-stream")
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        writer = asyncio.ensure_future(self._write(send))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not writer.done():
                writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def _write(self, send: Send) -> None:
        try:
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-write
            pass
        finally:
            await _close(self.events)


async def _close(events: Any) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()
