"""OpenAI request fields -> the `llm` model's sampling_parameters (Pagetron's SamplingParams keys).

Only fields the client set are sent, so the engine's defaults (OpenAI's: temperature 1, top_p 1) apply
to the rest, and the engine validates every range, naming the key.
"""

from __future__ import annotations

from typing import Any

from pagetron.backend.openai_api.errors import bad_request
from pagetron.backend.openai_api.protocol import SamplingFields

# the same name on both sides
_PASSED_THROUGH = (
    "n",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
)


def sampling_parameters(
    request: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    lora_name: str | None = None,
    constraint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``constraint``: a structured_outputs the server adds itself (tool calls); one from the request
    too is a 400."""
    params: dict[str, Any] = {}
    for name in _PASSED_THROUGH:
        value = getattr(request, name)
        if value is not None:
            params[name] = value
    if params.get("seed") is not None:
        params["seed"] %= 2**63  # OpenAI takes any int64; the engine's seeds are >= 0
    params["max_tokens"] = max_tokens  # None: until the model's context is full (OpenAI's chat default)
    if logprobs is not None:
        params["logprobs"] = logprobs
    if lora_name is not None:
        params["lora_name"] = lora_name
    asked = structured_outputs(request)
    if asked is not None and constraint is not None:
        raise bad_request(
            "tool_choice", "a required or named tool choice cannot be combined with response_format"
        )
    if asked is not None or constraint is not None:
        params["structured_outputs"] = asked or constraint
    return params


def constraint_names(request: SamplingFields, tools: bool = False) -> dict[str, str]:
    """The engine's names for the constraint's fields -> the request's (for error params): a schema the
    engine refuses is ``structured_outputs.json`` there, ``response_format.json_schema.schema`` here."""
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_schema":
        return {"structured_outputs.json": "response_format.json_schema.schema"}
    for key in ("json", "regex", "choice", "grammar"):
        if getattr(request, f"guided_{key}") is not None:
            return {f"structured_outputs.{key}": f"guided_{key}"}
    if tools and request.structured_outputs is None:  # the grammar of a required or named tool choice
        return {"structured_outputs.json": "tools"}
    return {}


def structured_outputs(request: SamplingFields) -> dict[str, Any] | None:
    """The one constraint the request asks for (the engine validates its content), or None."""
    asked: dict[str, dict[str, Any]] = {}
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        asked["response_format"] = {"json_object": True}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format.json_schema", "json_schema needs a schema")
        asked["response_format"] = {"json": fmt.json_schema.schema_}
    if request.structured_outputs is not None:
        asked["structured_outputs"] = request.structured_outputs
    for key in ("json", "regex", "choice", "grammar"):
        value = getattr(request, f"guided_{key}")
        if value is not None:
            asked[f"guided_{key}"] = {key: value}
    if len(asked) > 1:
        raise bad_request(sorted(asked)[1], f"give one constraint; got {', '.join(sorted(asked))}")
    return next(iter(asked.values()), None)
