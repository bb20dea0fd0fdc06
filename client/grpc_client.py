"""Synchronous gRPC streaming client for the Triton `llm` model (tritonclient.grpc, ModelStreamInfer).

    for chunk in generate("localhost:8001", "Once upon a time", {"max_tokens": 16}):
        print(chunk.text, end="", flush=True)

Every request goes over its own bidirectional stream, so breaking out of the loop (or a timeout) cancels
exactly that request on the server.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pagetron.client.errors import TritonRequestError
from pagetron.client.request import EMPTY_FINAL_RESPONSE_PARAM, STREAM_HEADERS, GenerateRequest
from pagetron.client.response import GenerationChunk, GenerationResult, parse_result

DEFAULT_MODEL = "llm"
DEFAULT_GRPC_URL = "localhost:8001"


class TritonLLMClient:
    """One gRPC channel to a Triton server; `generate` may be called many times (one stream each)."""

    def __init__(self, url: str = DEFAULT_GRPC_URL, model: str = DEFAULT_MODEL) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url
        self.model = model
        self._client = grpcclient.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonLLMClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_ready(self, timeout: float | None = None) -> bool:
        """Model readiness as the server reports it; raises TritonRequestError if the server can't answer."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self._client.is_model_ready(self.model, client_timeout=timeout))
        except InferenceServerException as e:
            raise TritonRequestError.from_client_exception(e) from None

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> Iterator[GenerationChunk]:
        """Yield the chunks of one request as they arrive; raises TritonRequestError on any failure.

        `timeout` (seconds) bounds the whole request: it is the stream's gRPC deadline and also how long
        this side waits, so a hung server cannot block the caller past it.
        """
        responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        deadline = None if timeout is None else time.monotonic() + timeout
        finished = False
        self._client.start_stream(
            callback=lambda result, error: responses.put((result, error)),
            stream_timeout=timeout,
            headers=STREAM_HEADERS,
        )
        try:
            self._send(request, responses)
            while not finished:
                result, error = _next_response(responses, deadline, timeout)
                if error is not None:
                    raise TritonRequestError.from_client_exception(error)
                chunk = parse_result(result)
                finished = chunk.final
                if chunk.has_content:
                    yield chunk
        finally:
            # A request that did not finish (error, timeout, caller stopped iterating) is cancelled.
            self._client.stop_stream(cancel_requests=not finished)

    def _send(self, request: GenerateRequest, responses: queue.Queue[tuple[Any, Any]]) -> None:
        from tritonclient.utils import InferenceServerException

        try:
            self._client.async_stream_infer(
                self.model,
                request.infer_inputs(),
                request_id=request.request_id,
                parameters={EMPTY_FINAL_RESPONSE_PARAM: True},
            )
        except InferenceServerException as e:
            # The stream already failed (e.g. connection refused); its callback holds the real reason.
            try:
                _, error = responses.get(timeout=1.0)
            except queue.Empty:
                error = e
            raise TritonRequestError.from_client_exception(error or e) from None

    def complete(self, request: GenerateRequest, timeout: float | None = None) -> GenerationResult:
        result = GenerationResult()
        for chunk in self.generate(request, timeout=timeout):
            result.add(chunk)
        return result


def _next_response(
    responses: queue.Queue[tuple[Any, Any]], deadline: float | None, timeout: float | None
) -> tuple[Any, Any]:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return responses.get(timeout=wait)
    except queue.Empty:
        raise TritonRequestError(f"no final response within {timeout} s", "DEADLINE_EXCEEDED") from None


def generate(
    url: str,
    prompt: str | Sequence[int],
    sampling_params: Mapping[str, Any] | None = None,
    stream: bool = True,
    model: str = DEFAULT_MODEL,
    timeout: float | None = None,
    **options: Any,
) -> Iterator[GenerationChunk]:
    """Yield the chunks of one request (one chunk when stream=False).

    `options` are the other GenerateRequest fields: exclude_input_in_output, return_finish_reason,
    return_cumulative_logprob, return_logprobs, return_num_input_tokens, return_num_output_tokens,
    request_id.
    """
    request = GenerateRequest(prompt, dict(sampling_params or {}), stream=stream, **options)
    with TritonLLMClient(url, model) as client:
        yield from client.generate(request, timeout=timeout)


def complete(
    url: str,
    prompt: str | Sequence[int],
    sampling_params: Mapping[str, Any] | None = None,
    stream: bool = False,
    model: str = DEFAULT_MODEL,
    timeout: float | None = None,
    **options: Any,
) -> GenerationResult:
    """The whole generation of one request, chunks folded together."""
    result = GenerationResult()
    for chunk in generate(url, prompt, sampling_params, stream, model, timeout, **options):
        result.add(chunk)
    return result
