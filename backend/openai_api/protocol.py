"""Request bodies of the OpenAI API, as pydantic models: a wrong type or an unknown field is a 400 that
names the field. Fields OpenAI defines but Pagetron cannot honour are accepted only at their neutral
value (checked in ``unsupported()``), so a request is never served differently from what it asked.

Beyond OpenAI's fields, vLLM's sampling extensions are accepted (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, skip_special_tokens, include_stop_str_in_output), which the
openai client sends through ``extra_body``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pagetron.backend.core.chat_messages import utf8_problem
from pagetron.backend.core.sampling_params import MAX_N

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]  # what the int32 input_ids tensor can carry


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # the openai client sends null for every argument given as None; OpenAI reads it as the default
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def check_text(value: Any) -> Any:
    """Every string must be valid Unicode (a pydantic validator; see chat_template.utf8_problem)."""
    for text in value if isinstance(value, list) else [value]:
        problem = utf8_problem(text) if isinstance(text, str) else None
        if problem is not None:
            raise ValueError(problem)
    return value


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # nothing is obfuscated here; accepted and ignored


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always enforced (xgrammar), strict or not


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(_Body):
    """Shared by completions and chat completions."""

    model: str
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # accepted and ignored: they ask nothing of the generation
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # accepted only at their neutral value (see unsupported())
    store: bool | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # constrained decoding: OpenAI's response_format, vLLM's structured_outputs and its older guided_* keys
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    _check_stop = field_validator("stop")(check_text)

    def unsupported(self) -> str | None:
        """The first field set to something Pagetron cannot do, or None."""
        if self.logit_bias:
            return "logit_bias"
        if self.store:
            return "store"
        if self.stream_options is not None and not self.stream:
            return "stream_options"  # OpenAI allows it only with stream: true
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()

    _check_prompt = field_validator("prompt")(check_text)


class ChatMessage(BaseModel):
    # checked field by field (roles, text parts) by the server's chat template code, which names them
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.modalities is not None and self.modalities != ["text"]:
            return "modalities"
        for name in ("reasoning_effort", "verbosity", "prediction"):  # for other kinds of models
            if getattr(self, name) is not None:
                return name
        return super().unsupported()


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    _check_input = field_validator("input")(check_text)
