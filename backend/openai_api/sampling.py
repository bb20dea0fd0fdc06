"""OpenAI request fields -> the `llm` model's sampling_parameters (Pagetron's SamplingParams keys).

Only fields the client set are sent, so the engine's defaults (OpenAI's: temperature 1, top_p 1) apply
to the rest, and the engine validates every range, naming the key.
"""

from __future__ import annotations

from typing import Any

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
    request: SamplingFields, max_tokens: int | None, logprobs: int | None, lora_name: str | None = None
) -> dict[str, Any]:
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
    return params
