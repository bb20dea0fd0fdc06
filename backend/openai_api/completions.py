"""POST /v1/completions: each prompt is one Triton request (its `n` outputs come back together); choice
``prompt_index * n + output_index``, as OpenAI numbers them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pagetron.backend.openai_api.errors import bad_request
from pagetron.backend.openai_api.logprobs import completion_logprobs
from pagetron.backend.openai_api.protocol import CompletionRequest
from pagetron.backend.openai_api.sampling import constraint_names, sampling_parameters
from pagetron.backend.openai_api.streams import (
    DONE,
    event,
    gather_or_cancel,
    merge_streams,
    new_id,
    now,
    usage,
)
from pagetron.backend.openai_api.triton_gateway import TritonGateway
from pagetron.client.request import GenerateRequest
from pagetron.client.response import GenerationResult

# the engine's names for what the request calls otherwise
RENAMED = {"text_input": "prompt", "input_ids": "prompt", "prompt_token_ids": "prompt"}


def rename_for(body: CompletionRequest) -> dict[str, str]:
    """The engine's names for fields -> this request's."""
    return RENAMED | constraint_names(body)


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt", "must not be empty")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


def triton_requests(body: CompletionRequest, lora_name: str | None = None) -> list[GenerateRequest]:
    if body.echo and body.logprobs is not None:
        raise bad_request("echo", "echo with logprobs needs prompt logprobs, which are not supported")
    prompts = _prompts(body.prompt)
    if body.echo and body.stream and any(not isinstance(p, str) for p in prompts):
        raise bad_request("echo", "streaming echo needs text prompts (the server would have to decode ids)")
    sampling = sampling_parameters(body, body.max_tokens, body.logprobs, lora_name)
    return [
        GenerateRequest(
            prompt,
            sampling,
            stream=body.stream,
            exclude_input_in_output=not (body.echo and not body.stream),
            return_logprobs=body.logprobs is not None,
            return_num_input_tokens=True,
            return_num_output_tokens=True,
        )
        for prompt in prompts
    ]


async def create_completion(gateway: TritonGateway, body: CompletionRequest) -> dict[str, Any]:
    requests = triton_requests(body, gateway.lora_name(body.model))
    results: list[GenerationResult] = await gather_or_cancel([gateway.complete(r) for r in requests])
    choices = []
    for p, result in enumerate(results):
        for j, text in enumerate(result.texts):
            logprobs = None
            if body.logprobs is not None and result.logprobs:
                logprobs = completion_logprobs(result.logprobs[j], result.token_ids[j], body.logprobs, 0)
            choices.append(
                {
                    "index": p * body.n + j,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": result.finish_reasons[j],
                }
            )
    prompt_tokens = sum(r.num_input_tokens or 0 for r in results)
    completion_tokens = sum(sum(r.num_output_tokens) for r in results)
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": body.model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


async def stream_completion(gateway: TritonGateway, body: CompletionRequest) -> AsyncIterator[bytes]:
    """The SSE events of a streamed completion. The first is yielded only once Triton has answered, so
    a refused request still gets an HTTP error status."""
    requests = triton_requests(body, gateway.lora_name(body.model))
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": body.model}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    tail = {"usage": None} if include_usage else {}
    prompt_tokens: dict[int, int] = {}
    completion_tokens = 0
    offsets = [0] * (len(requests) * body.n)
    echoed: set[int] = set()
    async for p, chunk in merge_streams([gateway.generate(r) for r in requests]):
        if chunk.num_input_tokens is not None:
            prompt_tokens[p] = chunk.num_input_tokens
        completion_tokens += chunk.num_tokens
        if body.echo and p not in echoed:
            echoed.add(p)
            for j in range(body.n):
                choice = {"index": p * body.n + j, "text": requests[p].prompt, "logprobs": None}
                yield event({**head, "choices": [{**choice, "finish_reason": None}], **tail})
        ids_by_output = chunk.token_ids_by_output() if body.logprobs is not None else []
        for j, text in enumerate(chunk.texts):
            reason = chunk.finish_reasons[j] if j < len(chunk.finish_reasons) else None
            index = p * body.n + j
            logprobs = None
            if body.logprobs is not None and chunk.logprobs is not None and j < len(ids_by_output):
                logprobs = completion_logprobs(
                    chunk.logprobs[j], ids_by_output[j], body.logprobs, offsets[index]
                )
                offsets[index] += len(text)
            if text or reason or logprobs:
                choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
                yield event({**head, "choices": [choice], **tail})
    if include_usage:
        yield event({**head, "choices": [], "usage": usage(sum(prompt_tokens.values()), completion_tokens)})
    yield DONE
