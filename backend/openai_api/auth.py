"""Bearer-token check on /v1, as ASGI middleware: a request without the key gets OpenAI's 401 before any
of its body is read or parsed (a FastAPI dependency would run only after the JSON body was decoded)."""

from __future__ import annotations

import secrets

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pagetron.backend.openai_api.errors import OpenAIError

PROTECTED_PREFIX = "/v1"


class RequireApiKey:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _protected(scope["path"]) and not self._authorized(scope):
            message = "Incorrect or missing API key (send 'Authorization: Bearer <key>')"
            error = OpenAIError(401, message, code="invalid_api_key")
            await JSONResponse(error.body(), status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")  # raw bytes: a non-ASCII token is a 401
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.expected)


def _protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
