"""The OpenAI-compatible HTTP API in front of Triton (FastAPI): every request becomes Triton gRPC calls.

uvicorn.run(create_app(FrontendSettings(triton_url="localhost:8001")), port=9000)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from pagetron.backend.openai_api import chat, completions, embeddings
from pagetron.backend.openai_api.auth import PROTECTED_PREFIX, RequireApiKey
from pagetron.backend.openai_api.body_limit import BodyRefused, LimitRequestBodies, refusal
from pagetron.backend.openai_api.disconnect import ClientDisconnected, EventStream, until_disconnected
from pagetron.backend.openai_api.errors import (
    OpenAIError,
    from_triton,
    unknown_model,
    validation_error,
)
from pagetron.backend.openai_api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from pagetron.backend.openai_api.streams import DONE, event, now
from pagetron.backend.openai_api.triton_gateway import ServedModels, TritonGateway
from pagetron.client.errors import TritonRequestError
from pagetron.client.probe import probe_request

logger = logging.getLogger("pagetron.openai")

HEALTH_TIMEOUT_S = 10.0
IN_FLIGHT_BODIES = 8  # the default budget for the bodies of all requests in flight, in largest bodies


@dataclass(frozen=True)
class FrontendSettings:
    triton_url: str = "localhost:8001"
    api_key: str | None = None  # None: no authentication
    models: ServedModels = field(default_factory=ServedModels)
    # larger request bodies get 413 before they are read (`pagetron openai` sets it; None: no limits)
    max_request_bytes: int | None = None
    # the bodies of all requests being handled, together (429 past it); None: 8 x max_request_bytes
    max_request_bytes_in_flight: int | None = None


def create_app(settings: FrontendSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.gateway = TritonGateway(settings.triton_url, settings.models)  # on the serving loop
        yield
        await app.state.gateway.close()

    app = FastAPI(title="Pagetron OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)
    _install_error_handlers(app)

    if settings.api_key is not None:
        app.add_middleware(RequireApiKey, api_key=settings.api_key)
    if settings.max_request_bytes is not None:  # added last: the outermost, before the key check
        in_flight = settings.max_request_bytes_in_flight or IN_FLIGHT_BODIES * settings.max_request_bytes
        app.add_middleware(
            LimitRequestBodies, max_bytes=settings.max_request_bytes, max_bytes_in_flight=in_flight
        )

    v1 = APIRouter(prefix=PROTECTED_PREFIX)

    def gateway(request: Request) -> TritonGateway:
        return request.app.state.gateway

    async def served(request: Request, model: str, kind: str) -> None:
        """404 unless ``model`` is the served model of this kind and Triton has it READY."""
        names = settings.models
        wanted = names.llm if kind == "llm" else names.embed
        if model in names.adapters or model in gateway(request).resolved:  # an adapter of the llm model:
            model = names.llm  # served when that model is
        elif kind == "llm" and names.resolve_adapters and model not in (names.llm, names.embed):
            if await _resolves(gateway(request), model):
                model = names.llm
        if model not in (names.llm, names.embed):
            raise unknown_model(model, list(await cards(request)))
        if model != wanted:
            other = "/v1/embeddings" if kind == "llm" else "/v1/completions or /v1/chat/completions"
            raise OpenAIError(400, f"model {model!r} is not served by this endpoint; use {other}", "model")
        if model not in await _ready(gateway(request)):
            raise OpenAIError(
                503, f"model {model!r} is not ready on the Triton server", "model", "model_not_ready"
            )

    @app.get("/health")
    async def health(request: Request) -> Response:
        """A real one-token generation on the llm model."""
        try:
            result = await asyncio.wait_for(gateway(request).complete(probe_request()), HEALTH_TIMEOUT_S)
        except TritonRequestError as e:
            if from_triton(e).status == 429:  # alive, only full: a probe must not get it restarted
                return JSONResponse({"status": "busy", "generated_tokens": 0, "detail": e.message})
            return JSONResponse(OpenAIError(503, f"unhealthy: {e}").body(), status_code=503)
        except asyncio.TimeoutError:
            message = f"no token within {HEALTH_TIMEOUT_S:.0f} s"
            return JSONResponse(OpenAIError(503, f"unhealthy: {message}").body(), status_code=503)
        return JSONResponse({"status": "ok", "generated_tokens": sum(result.num_output_tokens)})

    async def cards(request: Request) -> dict[str, dict[str, Any]]:
        """The ready models, and the llm model's adapters (with it as their parent) while it is ready."""
        ready = await _ready(gateway(request), cached=False)
        cards = {m: _model_card(m) for m in ready}
        if settings.models.llm in ready:
            adapters = gateway(request).adapters()
            cards.update({a: _model_card(a, parent=settings.models.llm) for a in adapters})
        return cards

    @v1.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": list((await cards(request)).values())}

    @v1.get("/models/{model}")
    async def get_model(request: Request, model: str) -> dict[str, Any]:
        known = await cards(request)
        if model not in known:
            raise unknown_model(model, list(known))
        return known[model]

    @v1.post("/completions")
    async def create_completion(request: Request, body: CompletionRequest) -> Response:
        await served(request, body.model, "llm")
        _refuse_unsupported(body)
        if body.stream:
            return await _stream(
                request, completions.stream_completion(gateway(request), body), completions.rename_for(body)
            )
        work = completions.create_completion(gateway(request), body)
        return await _respond(request, work, completions.rename_for(body))

    @v1.post("/chat/completions")
    async def create_chat_completion(request: Request, body: ChatCompletionRequest) -> Response:
        await served(request, body.model, "llm")
        _refuse_unsupported(body)
        if body.stream:
            return await _stream(
                request, chat.stream_chat_completion(gateway(request), body), chat.rename_for(body)
            )
        return await _respond(
            request, chat.create_chat_completion(gateway(request), body), chat.rename_for(body)
        )

    @v1.post("/embeddings")
    async def create_embeddings(request: Request, body: EmbeddingRequest) -> Response:
        await served(request, body.model, "embed")
        return await _respond(request, embeddings.create_embeddings(gateway(request), body), {})

    app.include_router(v1)
    return app


async def _ready(gateway: TritonGateway, cached: bool = True) -> list[str]:
    try:
        return await gateway.ready_models(cached=cached)
    except TritonRequestError as e:
        raise OpenAIError(503, f"the Triton server is unreachable: {e}", code="triton_unavailable") from None


async def _resolves(gateway: TritonGateway, model: str) -> bool:
    """Whether the server knows an adapter called ``model``; an adapter that does not load is the
    request's error (400, naming ``model``)."""
    try:
        return await gateway.resolve_adapter(model)
    except TritonRequestError as e:
        raise from_triton(e, {"lora_name": "model", "lora_request": "model"}) from None


def _model_card(model: str, parent: str | None = None) -> dict[str, Any]:
    card = {"id": model, "object": "model", "created": now(), "owned_by": "pagetron"}
    if parent is not None:  # a LoRA adapter (vLLM's cards carry root and parent the same way)
        card.update(root=model, parent=parent)
    return card


def _refuse_unsupported(body: Any) -> None:
    name = body.unsupported()
    if name is not None:
        raise OpenAIError(400, f"{name}: is not supported by this server", param=name)


async def _respond(request: Request, work: Awaitable[dict[str, Any]], rename: dict[str, str]) -> Response:
    try:
        payload = await until_disconnected(request.receive, work)
    except TritonRequestError as e:
        raise from_triton(e, rename) from None
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the Triton requests were cancelled
    return JSONResponse(payload)


async def _stream(request: Request, events: AsyncIterator[bytes], rename: dict[str, str]) -> Response:
    """Waits for the first event (so errors before it get their HTTP status), then streams the rest; an
    error later on becomes an error event followed by [DONE], as vLLM sends it."""
    try:
        first = await until_disconnected(request.receive, events.__anext__())
    except TritonRequestError as e:
        await events.aclose()
        raise from_triton(e, rename) from None
    except ClientDisconnected:
        await events.aclose()
        return Response(status_code=499)
    except StopAsyncIteration:
        first = DONE

    async def rest() -> AsyncIterator[bytes]:
        try:
            yield first
            async for item in events:
                yield item
        except TritonRequestError as e:
            yield event(from_triton(e, rename).body())
            yield DONE
        except Exception as e:  # the status line is gone: the client still learns the stream failed
            logger.exception("streamed response failed")
            yield event(OpenAIError(500, f"internal server error: {type(e).__name__}: {e}").body())
            yield DONE
        finally:
            await events.aclose()

    return EventStream(rest())


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(list(exc.errors()))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(BodyRefused)
    async def body_refused(_: Request, exc: BodyRefused) -> JSONResponse:
        return refusal(exc.error)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        error = OpenAIError(exc.status_code, str(exc.detail))
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        error = OpenAIError(500, f"internal server error: {type(exc).__name__}: {exc}")
        return JSONResponse(error.body(), status_code=500)
