"""Structured outputs and tool calls served: the `structured_outputs` key (and the older `guided_decoding`)
in Triton's sampling_parameters over gRPC streaming, with LoRA; OpenAI's response_format (json_schema,
json_object, the client's `parse()` with a pydantic model), vLLM's structured_outputs in extra_body, and
tools with tool_choice required, named and auto, streamed and not. The session's tiny random model makes
noise unconstrained, so every structure below comes from the grammar; served outputs equal the offline
engine's. Bad constraints are INVALID_ARG / 400 naming the problem, and the model keeps serving."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpc_helpers import stream_generate
from pagetron.backend import SamplingParams

TRIP = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["city", "days", "ok"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
CHAT = [{"role": "user", "content": "Weather?"}]


def offline_text(llm, prompt, **params) -> str:
    [out] = llm.generate([prompt], SamplingParams(temperature=0, **params), use_tqdm=False)
    return out.outputs[0].text


# ---- Triton: sampling_parameters ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "constraint", "check"),
    [
        (
            "structured_outputs",
            {"regex": "[a-c]{2}-[0-9]{3}"},
            lambda t: re.fullmatch("[a-c]{2}-[0-9]{3}", t),
        ),
        ("guided_decoding", {"choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
        ("structured_outputs", {"json": TRIP}, lambda t: jsonschema.validate(json.loads(t), TRIP) is None),
    ],
)
def test_grpc_streams_follow_the_constraint(triton_server, tiny_llm, key, constraint, check):
    sampling = {"temperature": 0, "max_tokens": 120, key: constraint}
    result = stream_generate(triton_server.grpc_url, "Once upon a time", sampling, stream=True)
    assert result.error is None and result.finish_reason == "stop"
    assert check(result.text), result.text
    assert result.text == offline_text(
        tiny_llm, "Once upon a time", max_tokens=120, structured_outputs=constraint
    )


def test_a_lora_request_follows_its_grammar(triton_server):
    sampling = {
        "temperature": 0,
        "max_tokens": 12,
        "lora_name": "sql",
        "structured_outputs": {"regex": "SELECT [a-z]{1,4}"},
    }
    result = stream_generate(triton_server.grpc_url, "Query:", sampling, stream=True)
    assert result.error is None and re.fullmatch("SELECT [a-z]{1,4}", result.text), result


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (
            {"json": {"type": "object", "properties": {"a": {"type": "strin"}}}},
            "structured_outputs.json: not a valid JSON schema at properties/a/type",
        ),
        ({"regex": "[a-"}, "structured_outputs.regex: Regex parsing error"),
        (
            {"grammar": "root ::= undefined_rule"},
            'structured_outputs.grammar: EBNF parser error at line 1, column 10: Rule "undefined_rule" is '
            "not defined",
        ),
        ({"json": {}, "regex": "a"}, "structured_outputs': give exactly one of"),
    ],
)
def test_a_bad_constraint_is_invalid_arg_naming_it(triton_server, constraint, message):
    result = stream_generate(
        triton_server.grpc_url, "Hi", {"max_tokens": 4, "structured_outputs": constraint}
    )
    assert (
        result.error is not None and result.error.startswith("[INVALID_ARG]") and message in result.error
    ), result.error
    ok = stream_generate(
        triton_server.grpc_url, "Hi", {"max_tokens": 4, "structured_outputs": {"choice": ["x"]}}
    )
    assert ok.error is None and ok.text == "x"


# random schemas straight from a client: refused or obeyed, never a crash
_leaf = st.sampled_from(
    [
        {"type": "boolean"},
        {"enum": [1, "a", None]},
        {"type": "string", "maxLength": 3},
        {"type": "nope"},
        {"minimum": "x"},
        {"type": "integer", "minimum": 0, "maximum": 5},
        {"pattern": "[", "type": "string"},
    ]
)
_schemas = st.recursive(
    _leaf,
    lambda inner: st.builds(
        lambda p: {"type": "object", "properties": p, "required": sorted(p)},
        st.dictionaries(st.sampled_from("xyz"), inner, max_size=2),
    ),
    max_leaves=4,
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schemas)
def test_random_schemas_never_crash_the_server(triton_server, schema):
    sampling = {
        "temperature": 0,
        "max_tokens": 40,
        "structured_outputs": {"json": schema, "disable_any_whitespace": True},
    }
    result = stream_generate(triton_server.grpc_url, "{", sampling, stream=True)
    if result.error is not None:
        assert result.error.startswith("[INVALID_ARG] structured_outputs.json"), result.error
    elif result.finish_reason == "stop":
        jsonschema.validate(json.loads(result.text), schema)


# ---- OpenAI: response_format, structured_outputs, tools --------------------------------------------------
@pytest.fixture(scope="module")
def client(openai_stack):
    return openai_stack.frontend.client()


class Trip(pydantic.BaseModel):
    city: str = pydantic.Field(pattern="^(Paris|Rome)$")
    days: int = pydantic.Field(ge=1, le=9)
    ok: bool


def test_response_format_json_schema_and_parse(client, tiny_llm):
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": TRIP, "strict": True}}
    reply = client.chat.completions.create(
        model="llm", messages=CHAT, max_tokens=120, temperature=0, response_format=fmt
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), TRIP)
    assert reply.choices[0].message.content == offline_text(
        tiny_llm, {"messages": CHAT}, max_tokens=120, structured_outputs={"json": TRIP}
    )
    parsed = client.chat.completions.parse(
        model="llm", messages=CHAT, max_tokens=120, temperature=0, response_format=Trip
    )
    assert isinstance(parsed.choices[0].message.parsed, Trip) and parsed.choices[0].finish_reason == "stop"


def test_response_format_json_object_and_extra_body_constraints(client, tiny_llm):
    chat = [{"role": "user", "content": "Go"}]
    reply = client.chat.completions.create(model="llm", messages=chat, max_tokens=120, temperature=0,
                                           response_format={"type": "json_object"})  # fmt: skip
    assert reply.choices[0].finish_reason == "stop" and isinstance(
        json.loads(reply.choices[0].message.content), dict
    )
    pick = {"structured_outputs": {"choice": ["left", "right"]}}
    choice = client.completions.create(
        model="llm", prompt="Pick:", max_tokens=8, temperature=0, extra_body=pick
    )
    assert choice.choices[0].text in ("left", "right")
    phone = {"guided_regex": "[0-9]{3}-[0-9]{4}"}
    stream = client.chat.completions.create(
        model="llm", messages=CHAT, max_tokens=12, temperature=0, stream=True, extra_body=phone
    )
    assert re.fullmatch(
        "[0-9]{3}-[0-9]{4}", "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    )
    with pytest.raises(openai.BadRequestError, match="give one constraint"):
        client.chat.completions.create(model="llm", messages=CHAT, response_format={"type": "json_object"},
                                       extra_body={"guided_regex": "a"})  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="structured_outputs.json: not a valid JSON schema"):
        client.chat.completions.create(model="llm", messages=CHAT, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}})  # fmt: skip


def check_calls(calls, tools) -> list[str]:
    """The calls' names, each call's arguments validated against its function's schema."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    return [call.function.name for call in calls]


def stream_calls(stream) -> tuple[dict[int, dict], str | None]:
    """index -> {"id", "name", "arguments"} assembled from streamed deltas, and the finish reason."""
    calls, reason = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            reason = choice.finish_reason or reason
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = call["id"] or delta.id
                call["name"] = call["name"] or (delta.function.name if delta.function else None)
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    return calls, reason


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_required(client, parallel):
    tools = [WEATHER, TIME]
    args = dict(model="llm", messages=CHAT, tools=tools, tool_choice="required", max_tokens=200,
                temperature=0, parallel_tool_calls=parallel)  # fmt: skip
    reply = client.chat.completions.create(**args)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content is None
    names = check_calls(message.tool_calls, tools)
    assert names and (parallel or len(names) == 1)
    calls, reason = stream_calls(client.chat.completions.create(**args, stream=True))
    assert reason == "tool_calls" and [c["name"] for c in calls.values()] == names
    assert [json.loads(c["arguments"]) for c in calls.values()] == [
        json.loads(c.function.arguments) for c in message.tool_calls
    ]


def test_tool_choice_named(client):
    tools = [WEATHER, TIME]
    named = {"type": "function", "function": {"name": "get_time"}}
    args = dict(model="llm", messages=CHAT, tools=tools, tool_choice=named, max_tokens=60, temperature=0)
    reply = client.chat.completions.create(**args)
    assert check_calls(reply.choices[0].message.tool_calls, tools) == ["get_time"]
    calls, reason = stream_calls(client.chat.completions.create(**args, stream=True))
    assert reason == "stop" and list(calls) == [0] and calls[0]["name"] == "get_time"
    assert calls[0]["arguments"] == reply.choices[0].message.tool_calls[0].function.arguments
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(
            **{**args, "tool_choice": {"type": "function", "function": {"name": "nope"}}}
        )


def test_tool_choice_auto_parses_the_models_own_format(client):
    """The tiny model cannot choose to call a tool, so a regex makes it write a Hermes-style call, as
    SmolLM2 and Qwen write them; the frontend turns it into tool_calls, streamed or not."""
    written = (
        r'Checking\. <tool_call>\{"name": "get_weather", '
        r'"arguments": \{"city": "Rome", "celsius": true\}\}</tool_call>'
    )
    args = dict(model="llm", messages=CHAT, tools=[WEATHER], max_tokens=60, temperature=0,
                extra_body={"structured_outputs": {"regex": written}})  # fmt: skip
    reply = client.chat.completions.create(**args)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content == "Checking. "  # as written
    assert check_calls(message.tool_calls, [WEATHER]) == ["get_weather"]
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Rome", "celsius": True}
    calls, reason = stream_calls(client.chat.completions.create(**args, stream=True))
    assert reason == "tool_calls" and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Rome", "celsius": True}
    # the conversation goes on with the tool's result
    result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "21 C"}
    follow = [*CHAT, message.model_dump(exclude_none=True), result]
    done = client.chat.completions.create(
        model="llm", messages=follow, tools=[WEATHER], tool_choice="none", max_tokens=4
    )
    assert done.choices[0].message.tool_calls is None and done.usage.completion_tokens == 4
