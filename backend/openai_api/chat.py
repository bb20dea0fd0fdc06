"""POST /v1/chat/completions: the conversation goes to Triton as the `messages` input (and `tools` as the
`tools` input), so the server renders it with the model's own chat template; one Triton request carries
all `n` choices. Tool calls: see tools.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pagetron.backend.core.chat_messages import validate_messages
from pagetron.backend.core.errors import InvalidRequestError
from pagetron.backend.openai_api.errors import bad_request
from pagetron.backend.openai_api.logprobs import chat_logprobs
from pagetron.backend.openai_api.protocol import ChatCompletionRequest
from pagetron.backend.openai_api.sampling import constraint_names, sampling_parameters
from pagetron.backend.openai_api.streams import DONE, event, new_id, now, usage
from pagetron.backend.openai_api.tools import (
    ToolCallStream,
    ToolPlan,
    calls_from_required,
    new_call,
    parse_calls,
    plan,
)
from pagetron.backend.openai_api.triton_gateway import TritonGateway
from pagetron.client.request import GenerateRequest

MAX_TOP_LOGPROBS = 20


def rename_for(body: ChatCompletionRequest) -> dict[str, str]:
    """The engine's names for fields -> this request's."""
    names = {"logprobs": "top_logprobs", "text_input": "messages", "prompt": "messages"}
    if body.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    return names | constraint_names(body, tools=bool(body.tools))


def triton_request(
    body: ChatCompletionRequest, lora_name: str | None = None
) -> tuple[GenerateRequest, ToolPlan]:
    try:
        messages = validate_messages([m.model_dump(exclude_unset=True) for m in body.messages])
        tool_plan = plan(body.tools, body.tool_choice, body.parallel_tool_calls)
    except InvalidRequestError as e:
        raise bad_request(e.field, e.message) from None
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise bad_request("top_logprobs", "needs logprobs set to true")
        if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {body.top_logprobs}")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    sampling = sampling_parameters(body, max_tokens, logprobs, lora_name, tool_plan.structured_outputs())
    request = GenerateRequest(
        messages,
        sampling,
        stream=body.stream,
        return_logprobs=body.logprobs,
        return_num_input_tokens=True,
        return_num_output_tokens=True,
        tools=tool_plan.tools if tool_plan.mode != "none" else None,
    )
    return request, tool_plan


def message(text: str, finish_reason: str | None, tool_plan: ToolPlan) -> tuple[dict[str, Any], str | None]:
    """The assistant message of one choice and its finish reason (tool_calls when the model called)."""
    content, calls = text, []
    if tool_plan.mode == "named":
        content, calls = None, [new_call(tool_plan.name, text)]
    elif tool_plan.mode == "required":
        content, calls = None, calls_from_required(text)
    elif tool_plan.mode == "auto":
        content, calls = parse_calls(text)
    out: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        out["tool_calls"] = calls
    return out, tool_plan.finish_reason(finish_reason, bool(calls))


async def create_chat_completion(gateway: TritonGateway, body: ChatCompletionRequest) -> dict[str, Any]:
    request, tool_plan = triton_request(body, gateway.lora_name(body.model))
    result = await gateway.complete(request)
    choices = []
    for j, text in enumerate(result.texts):
        logprobs = None
        if body.logprobs and result.logprobs:
            content = chat_logprobs(result.logprobs[j], result.token_ids[j], body.top_logprobs or 0)
            logprobs = {"content": content, "refusal": None}
        reply, finish_reason = message(text, result.finish_reasons[j], tool_plan)
        choices.append({"index": j, "message": reply, "logprobs": logprobs, "finish_reason": finish_reason})
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": body.model,
        "choices": choices,
        "usage": usage(result.num_input_tokens or 0, sum(result.num_output_tokens)),
    }


async def stream_chat_completion(gateway: TritonGateway, body: ChatCompletionRequest) -> AsyncIterator[bytes]:
    """Role deltas first (once Triton has answered, so a refused request still gets an HTTP error status),
    content deltas as tokens arrive, a finish_reason delta per choice, the usage chunk, then [DONE]."""
    request, tool_plan = triton_request(body, gateway.lora_name(body.model))
    streams = [ToolCallStream(tool_plan) for _ in range(body.n)]
    head = {
        "id": new_id("chatcmpl"),
        "object": "chat.completion.chunk",
        "created": now(),
        "model": body.model,
    }
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    tail = {"usage": None} if include_usage else {}
    prompt_tokens = completion_tokens = 0
    started = False
    async for chunk in gateway.generate(request):
        if not started:
            started = True
            for j in range(body.n):
                delta = {"role": "assistant", "content": ""}
                choice = {"index": j, "delta": delta, "logprobs": None, "finish_reason": None}
                yield event({**head, "choices": [choice], **tail})
        if chunk.num_input_tokens is not None:
            prompt_tokens = chunk.num_input_tokens
        completion_tokens += chunk.num_tokens
        ids_by_output = chunk.token_ids_by_output() if body.logprobs else []
        for j, text in enumerate(chunk.texts):
            logprobs = None
            if body.logprobs and chunk.logprobs is not None and j < len(ids_by_output):
                content = chat_logprobs(chunk.logprobs[j], ids_by_output[j], body.top_logprobs or 0)
                logprobs = {"content": content, "refusal": None}
            deltas = streams[j].feed(text) if text else []
            if logprobs and not deltas:
                deltas = [{"content": ""}]
            for k, delta in enumerate(deltas):
                choice = {
                    "index": j,
                    "delta": delta,
                    "logprobs": logprobs if k == 0 else None,
                    "finish_reason": None,
                }
                yield event({**head, "choices": [choice], **tail})
        for j, reason in enumerate(chunk.finish_reasons):
            if reason:
                for delta in streams[j].finish():
                    choice = {"index": j, "delta": delta, "logprobs": None, "finish_reason": None}
                    yield event({**head, "choices": [choice], **tail})
                reason = tool_plan.finish_reason(reason, streams[j].num_calls > 0)
                choice = {"index": j, "delta": {}, "logprobs": None, "finish_reason": reason}
                yield event({**head, "choices": [choice], **tail})
    if include_usage:
        yield event({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    yield DONE
