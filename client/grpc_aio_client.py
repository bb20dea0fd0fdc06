"""asyncio gRPC streaming client for the Triton `llm` model (tritonclient.grpc.aio), used by the benchmark.

    async with AsyncTritonLLMClient("localhost:8001") as client:
        async for chunk in client.generate(GenerateRequest("Hello", {"max_tokens": 8})):
            ...

Many requests may stream concurrently over one client (one gRPC stream per request, one channel).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pagetron.client.errors import TritonRequestError
from pagetron.client.grpc_client import DEFAULT_GRPC_URL, DEFAULT_MODEL
from pagetron.client.request import EMPTY_FINAL_RESPONSE_PARAM, STREAM_HEADERS, GenerateRequest
from pagetron.client.response import GenerationChunk, GenerationResult, parse_result


class AsyncTritonLLMClient:
    def __init__(self, url: str = DEFAULT_GRPC_URL, model: str = DEFAULT_MODEL) -> None:
        import tritonclient.grpc.aio as aioclient

        self.url = url
        self.model = model
        self._client = aioclient.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> AsyncTritonLLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def is_ready(self, timeout: float | None = None, model: str | None = None) -> bool:
        """Readiness of this client's model (or ``model``) as the server reports it; raises
        TritonRequestError if the server can't answer."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(await self._client.is_model_ready(model or self.model, client_timeout=timeout))
        except InferenceServerException as e:
            raise TritonRequestError.from_client_exception(e) from None

    async def infer(self, model: str, inputs: list[Any]) -> Any:
        """One plain (not decoupled) inference on another model over the same channel, e.g. `embed`;
        returns tritonclient's InferResult and raises TritonRequestError."""
        from tritonclient.utils import InferenceServerException

        try:
            return await self._client.infer(model, inputs)
        except InferenceServerException as e:
            raise TritonRequestError.from_client_exception(e) from None

    async def generate(
        self, request: GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[GenerationChunk]:
        """Yield the chunks of one request as they arrive; raises TritonRequestError on any failure.

        `timeout` (seconds) is the stream's gRPC deadline. Cancelling the consuming task, or leaving the
        loop early, cancels the request on the server.
        """
        import grpc

        # NOTE: built here, not inside the request iterator: an exception there makes grpc.aio cancel the
        # call and raise a bare CancelledError
        inputs = request.infer_inputs()

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": self.model,
                "inputs": inputs,
                "request_id": request.request_id,
                "parameters": {EMPTY_FINAL_RESPONSE_PARAM: True},
            }

        responses = self._client.stream_infer(one_request(), stream_timeout=timeout, headers=STREAM_HEADERS)
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    raise TritonRequestError.from_client_exception(error)
                chunk = parse_result(result)
                finished = chunk.final
                if chunk.has_content:
                    yield chunk
                if finished:
                    return
            raise TritonRequestError("stream closed before the final response", "UNAVAILABLE")
        except grpc.RpcError as e:
            raise TritonRequestError.from_rpc_error(e) from None
        finally:
            if not finished:
                responses.cancel()

    async def complete(self, request: GenerateRequest, timeout: float | None = None) -> GenerationResult:
        result = GenerationResult()
        async for chunk in self.generate(request, timeout=timeout):
            result.add(chunk)
        return result
