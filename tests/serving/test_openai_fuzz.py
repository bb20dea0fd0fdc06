"""Fuzzing the OpenAI frontend (`pagetron openai` in front of the real tritonserver, the tiny model): chat and
completion bodies whose fields take values of any shape (wrong types, NaN, huge and negative numbers,
nested junk, unknown keys), messages of every role with and without tool calls, tools, tool_choice and
response_format in random forms. Every reply is 200 with a completion or a 4xx in OpenAI's error shape;
never a 5xx, and the frontend and server stay whole. `PAGETRON_FUZZ_EXAMPLES` sets the
count: a fifth of it (60 in make test, 200 in make soak)."""

from __future__ import annotations

import json
import math
import os

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = max(1, int(os.environ.get("PAGETRON_FUZZ_EXAMPLES", "300")) // 5)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "none", "required", "json_object", "text", "1", "x" * 300]),
)
junk = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def mostly(valid, weight: int = 3):
    """Valid values ``weight`` times as often as junk: most bodies get past one field to the next."""
    return st.one_of(*[valid] * weight, junk)


SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"type": "string", "maxLength": 5},
    {"enum": ["é", 1]},
    {"type": "nope"},
    {"not": {}},
    {},
    [],
    "x",
]
schema = st.sampled_from(SCHEMAS)
function = st.fixed_dictionaries(
    {"name": st.sampled_from(["get_time", "f", "", "bad name!", 3])},
    optional={"parameters": schema | junk, "description": scalars, "strict": scalars},
)
tool = mostly(st.fixed_dictionaries({"type": st.just("function"), "function": function}))
call_function = st.fixed_dictionaries({"name": st.text(max_size=6), "arguments": st.text(max_size=20) | junk})
tool_call = st.fixed_dictionaries(
    {"id": st.text(max_size=6), "type": st.just("function"), "function": call_function}
)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=9)})
message = mostly(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "bot"]),
            "content": st.one_of(st.text(max_size=40), st.none(), st.lists(text_part, max_size=2), junk),
        },
        optional={"tool_calls": mostly(st.lists(tool_call, max_size=2)), "tool_call_id": scalars},
    ),
    2,
)
good_message = st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=30)})
json_schema = st.fixed_dictionaries(
    {"name": st.text(max_size=5)}, optional={"schema": schema, "strict": scalars}
)
response_format = st.fixed_dictionaries(
    {"type": st.sampled_from(["json_object", "text", "json_schema", "xml"])},
    optional={"json_schema": json_schema},
)
TOOL_CHOICES = ["auto", "none", "required", {"type": "function", "function": {"name": "get_time"}}]
SHARED = {
    "temperature": mostly(st.floats(0, 2)),
    "top_p": mostly(st.floats(0.01, 1)),
    "n": mostly(st.integers(1, 2)),
    "stop": mostly(st.lists(st.text(min_size=1, max_size=3), max_size=2)),
    "seed": mostly(st.integers(0, 9)),
    "max_tokens": st.integers(-2, 6) | scalars,
    "logprobs": scalars,
    "user": scalars,
    "presence_penalty": mostly(st.floats(-2, 2)),
    "frequency_penalty": scalars,
    "stream": st.booleans(),
    "logit_bias": junk,
    "response_format": mostly(response_format, 2),
    "stream_options": junk,
}
chat_bodies = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["llm", "llm", "llm", "nope"]),
        "messages": st.one_of(
            st.lists(good_message, min_size=1, max_size=2), st.lists(message, max_size=3), junk
        ),
    },
    optional={
        **SHARED,
        "tools": mostly(st.lists(tool, max_size=2), 2),
        "tool_choice": mostly(st.sampled_from(TOOL_CHOICES), 2),
        "parallel_tool_calls": scalars,
        "top_logprobs": scalars,
        "max_completion_tokens": st.integers(-1, 6),
    },
)
# bodies whose every field is of the right type (their values may still be refused: a bad schema, a tool
# choice naming no tool), so the cases reach generation, constraints and tool calls
plausible_chat_bodies = st.fixed_dictionaries(
    {"model": st.just("llm"), "messages": st.lists(good_message, min_size=1, max_size=2)},
    optional={
        "temperature": st.floats(0, 2),
        "n": st.integers(1, 2),
        "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
        "seed": st.integers(0, 9),
        "max_tokens": st.integers(1, 6),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 3),
        "stream": st.booleans(),
        "response_format": response_format,
        "tools": st.lists(
            st.fixed_dictionaries({"type": st.just("function"), "function": function}), max_size=2
        ),
        "tool_choice": st.sampled_from(TOOL_CHOICES),
        "parallel_tool_calls": st.booleans(),
    },
)
prompt = st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 60000), max_size=5), junk)
completion_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["llm", "llm", "nope"]), "prompt": prompt},
    optional={**SHARED, "echo": scalars, "best_of": scalars, "suffix": scalars},
)


def small(body: dict) -> dict:
    """Valid token counts above 6 would make a case slow; everything else goes as generated."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            if 6 < value < 10**6:
                body[key] = 6
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 4
    return body


def test_fuzzed_openai_bodies_get_a_completion_or_a_4xx_in_openais_shape(openai_stack):
    frontend = openai_stack.frontend
    headers = {"authorization": f"Bearer {frontend.api_key}", "content-type": "application/json"}
    statuses: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.one_of(
            st.tuples(st.just("/chat/completions"), chat_bodies),
            st.tuples(st.just("/chat/completions"), plausible_chat_bodies),
            st.tuples(st.just("/completions"), completion_bodies),
        )
    )
    def check(case):
        path, body = case
        content = json.dumps(small(body), allow_nan=True)
        response = httpx.post(f"{frontend.base_url}{path}", content=content, headers=headers, timeout=120)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (path, content[:2000], response.text[:2000])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        elif response.headers["content-type"].startswith("text/event-stream"):
            # an error after the stream began would come as an event: none may, and [DONE] ends it
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events and events[-1] == "[DONE]", response.text[-2000:]
            for event in events[:-1]:
                assert "error" not in json.loads(event), (content[:2000], event)
        else:
            assert response.json()["choices"], response.text[:2000]

    check()
    print(f"fuzzed OpenAI bodies: {sum(statuses.values())}, by status {dict(sorted(statuses.items()))}")
    ok = httpx.post(f"{frontend.base_url}/chat/completions", headers=headers, timeout=60,
                    content=json.dumps({"model": "llm", "max_tokens": 3,
                                        "messages": [{"role": "user", "content": "Hi"}]}))  # fmt: skip
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
