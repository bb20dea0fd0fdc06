"""Tool calls in the OpenAI frontend, without a server: the grammar each tool_choice needs, the model's own
call formats parsed, and streamed text turned into OpenAI's deltas at exact boundaries."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagetron.backend.core.errors import InvalidRequestError
from pagetron.backend.openai_api.tools import ToolCallStream, parse_calls, plan

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time"}}
DEEP: dict = {"type": "integer"}
for _ in range(5000):
    DEEP = {"type": "array", "items": DEEP}


def names_and_args(calls) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_the_grammar_of_each_tool_choice():
    assert (
        plan(None, None, None).mode == "none" and plan([WEATHER], "none", None).structured_outputs() is None
    )
    assert plan([WEATHER], None, None).mode == "auto"
    named = plan([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None)
    assert named.structured_outputs() == {
        "json": {"type": "object", "properties": {}}, "disable_any_whitespace": True}  # fmt: skip
    required = plan([WEATHER, TIME], "required", False).structured_outputs()["json"]
    assert required["minItems"] == 1 and required["maxItems"] == 1
    assert [a["properties"]["name"] for a in required["items"]["anyOf"]] == [
        {"const": "get_weather"}, {"const": "get_time"}]  # fmt: skip
    assert "maxItems" not in plan([WEATHER], "required", None).structured_outputs()["json"]


@pytest.mark.parametrize(
    ("tools", "choice", "field"),
    [
        (None, "required", "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], "sometimes", "tool_choice"),
        ([WEATHER, WEATHER], "auto", "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "has space"}}], "auto", "tools[0].function.name"),
        ([{"type": "retrieval"}], "auto", "tools[0].type"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": []}}],
            "auto",
            "tools[0].function.parameters",
        ),
        (  # nested past MAX_SCHEMA_DEPTH: refused before anything recurses through it
            [{"type": "function", "function": {"name": "f", "parameters": DEEP}}],
            "auto",
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tools_name_the_field(tools, choice, field):
    with pytest.raises(InvalidRequestError) as e:
        plan(tools, choice, None)
    assert e.value.field == field


def test_a_parameter_keyword_the_grammar_drops_is_refused_only_where_a_grammar_is_built():
    tags = {"type": "function", "function": {"name": "tag", "parameters": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}}  # fmt: skip
    for choice in ("required", {"type": "function", "function": {"name": "tag"}}):
        with pytest.raises(InvalidRequestError) as e:
            plan([WEATHER, tags], choice, None)
        assert e.value.field == "tools[1].function.parameters"
        assert (
            e.value.message
            == "not supported at /properties/tags: uniqueItems is not enforced by the grammar engine"
        )
    assert plan([WEATHER, tags], "auto", None).mode == "auto"  # the model's own format: no grammar
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert plan([WEATHER, tags], named, None).name == "get_weather"  # only the named tool's schema counts


def test_the_formats_models_write():
    hermes = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_calls(hermes)
    assert content == "Let me look.\n" and names_and_args(calls) == [("get_weather", {"city": "Oslo"})]
    smollm = (
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "A"}}, '
        '{"name": "get_time", "arguments": {}}]</tool_call>'
    )
    assert names_and_args(parse_calls(smollm)[1]) == [("get_weather", {"city": "A"}), ("get_time", {})]
    llama = (
        '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; '
        '{"name": "get_time", "parameters": {}}'
    )
    assert parse_calls(llama)[0] is None and len(parse_calls(llama)[1]) == 2
    assert parse_calls('{"answer": 42}') == ('{"answer": 42}', [])  # JSON, but no call: content
    assert parse_calls("a <tool_call>not json</tool_call> b") == ("a <tool_call>not json</tool_call> b", [])
    stringly = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"B\\"}"}</tool_call>'
    assert names_and_args(parse_calls(stringly)[1]) == [("get_weather", {"city": "B"})]


def feed_in_pieces(stream: ToolCallStream, text: str, size: int) -> list[dict]:
    deltas = []
    for i in range(0, len(text), size):
        deltas += stream.feed(text[i : i + size])
    return deltas + stream.finish()


def test_auto_streams_content_and_each_tagged_calls_arguments_as_they_come():
    text = 'Sure <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call> ok'
    deltas = feed_in_pieces(ToolCallStream(plan([WEATHER], "auto", None)), text, 4)
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Sure  ok"  # the tag never leaks into content, even split over pieces
    head, *arguments = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert len(arguments) > 1 and {a["index"] for a in arguments} == {0}
    assert "".join(a["function"]["arguments"] for a in arguments) == '{"city": "Oslo"}'
    # a tag holding a list of calls, or arguments written as a JSON string, goes whole at its closing tag
    listed = '<tool_call>[{"name": "get_weather", "arguments": {"city": "A"}}]</tool_call>'
    as_string = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"B\\"}"}</tool_call>'
    for text, city in ((listed, "A"), (as_string, "B")):
        deltas = feed_in_pieces(ToolCallStream(plan([WEATHER], "auto", None)), text, 5)
        calls = [d["tool_calls"][0] for d in deltas]
        assert [c["function"]["arguments"] for c in calls] == ["", json.dumps({"city": city})]
    # JSON that is no call is held to the end, then sent as content
    assert feed_in_pieces(ToolCallStream(plan([WEATHER], "auto", None)), '{"a": 1}', 3) == [
        {"content": '{"a": 1}'}
    ]


@pytest.mark.parametrize("piece", [1, 4, 9])
def test_auto_streams_llama3_calls_as_they_come(piece):
    weather = '{"name": "get_weather", "parameters": {"city": "X;Y"}}'
    time_call = '{"name": "get_time", "parameters": {}}'
    text = f"<|python_tag|>{weather}; {time_call}"
    deltas = feed_in_pieces(ToolCallStream(plan([WEATHER, TIME], "auto", None)), text, piece)
    assert all(list(d) == ["tool_calls"] for d in deltas)  # no content
    calls: dict[int, list[str]] = {}
    for d in deltas:
        function = d["tool_calls"][0]["function"]
        calls.setdefault(d["tool_calls"][0]["index"], [function.get("name")]).append(function["arguments"])
    assert {i: (parts[0], "".join(parts[1:])) for i, parts in calls.items()} == {
        0: ("get_weather", '{"city": "X;Y"}'),
        1: ("get_time", "{}"),
    }
    if piece == 1:
        assert len(calls[0]) > 3  # the arguments came in pieces
    # arguments written as a string, or text after the call: decided at the end, as before
    as_string = '{"name": "get_weather", "parameters": "{\\"city\\": \\"Z\\"}"}'
    [_, arguments] = feed_in_pieces(ToolCallStream(plan([WEATHER], "auto", None)), as_string, piece)
    assert arguments["tool_calls"][0]["function"]["arguments"] == '{"city": "Z"}'
    trailing = feed_in_pieces(ToolCallStream(plan([WEATHER], "auto", None)), weather + " Done.", piece)
    assert "".join(d.get("content", "") for d in trailing) == " Done."


def test_auto_streams_several_tagged_calls_and_a_cut_one_as_far_as_it_got():
    first = '<tool_call>{"name": "get_weather", "arguments": {"city": "x</tool_call>y"}}</tool_call>\n'
    text = first + '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n<tool_call>{"name": "get_ti'
    text += 'me", "arguments": {"zone": "U'  # max_tokens ends it here
    deltas = feed_in_pieces(ToolCallStream(plan([WEATHER, TIME], "auto", None)), text, 6)
    assert not any("content" in d for d in deltas)  # the newlines between calls: whitespace, no content
    calls: dict[int, list[str]] = {}
    for d in deltas:
        for call in d.get("tool_calls", []):
            function = call["function"]
            calls.setdefault(call["index"], [function.get("name")]).append(function["arguments"])
    assert {i: (parts[0], "".join(parts[1:])) for i, parts in calls.items()} == {
        0: ("get_weather", '{"city": "x</tool_call>y"}'),  # a closing tag inside a string is text
        1: ("get_time", "{}"),
        2: ("get_time", '{"zone": "U'),
    }
    # unstreamed, the same reply (without its cut call) reads the same way
    content, whole = parse_calls(text[: text.rindex("\n") + 1])
    assert content is None
    assert [json.loads(c["function"]["arguments"]) for c in whole] == [{"city": "x</tool_call>y"}, {}]


def test_a_tagged_call_without_its_closing_tag_ends_at_the_next_tag_or_the_reply():
    call = '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}'
    for text, content, names in (
        (call + "\nLet me know.", "\nLet me know.", ["get_time"]),
        (call + "\n" + call + "</tool_call>", "", ["get_time", "get_time"]),
        (call.replace("}}", "}") + "</tool_call> more", " more", ["get_time"]),  # its object never closed
    ):
        deltas = feed_in_pieces(ToolCallStream(plan([TIME], "auto", None)), text, 5)
        assert "".join(d.get("content", "") for d in deltas) == content, text
        calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert [c["function"]["name"] for c in calls if "id" in c] == names, text


def test_required_streams_each_calls_arguments_as_they_come():
    weather = '{"name": "get_weather", "parameters": {"city": "a]\\"}"}}'
    text = f'[{weather}, {{"name": "get_time", "parameters": {{}}}}]'
    stream = ToolCallStream(plan([WEATHER, TIME], "required", None))
    fed, seen = "", []  # (text fed so far, delta)
    for i in range(0, len(text), 7):
        fed += text[i : i + 7]
        seen += [(fed, d["tool_calls"][0]) for d in stream.feed(text[i : i + 7])]
    seen += [(fed, d["tool_calls"][0]) for d in stream.finish()]
    heads = [(fed, call) for fed, call in seen if "id" in call]
    assert [call["function"] for _, call in heads] == [
        {"name": "get_weather", "arguments": ""},
        {"name": "get_time", "arguments": ""},
    ]
    # a head goes out once its parameters have begun, not before
    assert heads[0][0].startswith('[{"name": "get_weather", "parameters": {')
    arguments: dict[int, list[str]] = {}
    for _, call in seen:
        if "id" not in call:
            arguments.setdefault(call["index"], []).append(call["function"]["arguments"])
    assert {i: "".join(parts) for i, parts in arguments.items()} == {0: '{"city": "a]\\"}"}', 1: "{}"}
    assert len(arguments[0]) > 1  # streamed in pieces, as they came
    assert [call["index"] for _, call in seen] == sorted(call["index"] for _, call in seen)


def test_required_sends_an_element_in_another_form_whole_and_a_cut_one_as_far_as_it_got():
    stream = ToolCallStream(plan([WEATHER], "required", None))
    deltas = stream.feed('[{"parameters": {"city": "Oslo"}, "name": "get_weather"}, ')
    deltas += stream.feed('{"name": "get_weather", "pa')
    deltas += stream.feed('rameters": {"city": "Ri') + stream.finish()  # max_tokens ends it here
    calls = [d["tool_calls"][0] for d in deltas]
    assert [(c["index"], c["function"].get("name"), c["function"]["arguments"]) for c in calls] == [
        (0, "get_weather", ""),
        (0, None, '{"city": "Oslo"}'),
        (1, "get_weather", ""),
        (1, None, '{"city": "Ri'),
    ]
    assert stream.num_calls == 2


def test_named_streams_the_arguments_as_they_come():
    stream = ToolCallStream(plan([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None))
    head, *args = stream.feed('{"ci') + stream.feed('ty":"Rome"}') + stream.finish()
    assert head["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert [a["tool_calls"][0]["function"]["arguments"] for a in args] == ['{"ci', 'ty":"Rome"}']


AUTO_REPLIES = [
    'Sure <tool_call>{"name": "get_weather", "arguments": {"city": "x</tool_call>y"}}</tool_call> ok',
    '<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>\n<tool_call>{"name": "get_weather", '
    '"arguments": {"city": "Q"}}</tool_call>',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "X;Y"}}; '
    '{"name": "get_time", "parameters": {}}',
    '{"name": "get_weather", "parameters": "{\\"city\\": \\"Z\\"}"}',
    '{"answer": 42} and <tool_call>not json</tool_call>',
    "plain text with < and <tool",
    '{"answer": 42} <tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
    '{"name": "get_weather", "parameters": {"city": "X"}} Done.',
    '{"name": "get_weather", "parameters": {"city": "X"}}; {"answer": 1}',
    '{"name": "get\\qtime", "parameters": {}}',  # not a JSON string: no call, and no crash
    '<tool_call>{"name": "a\tb", "arguments": {}}</tool_call>',
    '{"name": "get_weather", "parameters": {"city": "<tool_call>"}}',  # a tag inside a string is text
    '<tool_call>{"name": "get_time", "arguments": {}}\n<tool_call>{"name": "get_weather", "arguments": '
    '{"city": "Oslo"}}</tool_call>',  # no closing tag: the call ends at the next one
    '<tool_call>x;"name"{"name": "get_time", "parameters": {}}</tool_call>',  # a body of text
    "<tool_call>" + '{"name": "' + "n" * 600 + '", "arguments": {}}</tool_call>',  # a head too long to stream
    '\n  Sure.\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n\n',  # whitespace around
    ' \n<tool_call>{"name": "get_time", "arguments": {}}</tool_call> \n And after.\n',
    '{"name": "get_time", "parameters": {}};  then text ',
    " \n\t ",  # only whitespace
    # after Llama-3 calls everything is content, a tag too (and after "<call>;" with no call next)
    '\n{"name": "get_time", "parameters": {}}<tool_call>{"name": "get_time", "arguments": {}}é',
    '{"name": "get_time", "arguments": {}}<tool_call>{"name": "get_time", "parameters": {}}',
    '{"name": "get_time", "parameters": {}}; <tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
]


# pieces of replies in every format, put together at random
REPLY_PIECES = [
    "<tool_call>", "</tool_call>", '{"name": "get_weather", "arguments": {"city": "Rome"}}',
    '{"name": "get_time", "parameters": {}}', '{"name": "get_time", "arguments": {}}', "<|python_tag|>", "; ",
    " text ", "\n", '{"answer": 1}', '{"name": ', '"get_time"', "}", "{", "[", "]", ",", '"', "\\", "<tool",
    "_call>", '"arguments": ', '{"city": "a\\"b"}', "é", "</", "\t",
]  # fmt: skip
_replies = st.one_of(
    st.sampled_from(AUTO_REPLIES),
    st.lists(st.sampled_from(REPLY_PIECES), min_size=1, max_size=10).map("".join),
)


@settings(max_examples=300)
@given(_replies, st.lists(st.integers(1, 12), min_size=1, max_size=30))
def test_auto_streaming_in_any_pieces_gives_what_the_whole_reply_parses_to(reply, sizes):
    stream = ToolCallStream(plan([WEATHER, TIME], "auto", None))
    deltas, start = [], 0
    for size in sizes * (1 + len(reply) // max(1, sum(sizes))):
        deltas += stream.feed(reply[start : start + size])
        start += size
    deltas += stream.feed(reply[start:]) + stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for call in d.get("tool_calls", []):
            entry = calls.setdefault(call["index"], {"name": call["function"].get("name"), "arguments": ""})
            entry["arguments"] += call["function"]["arguments"]
    whole_content, whole_calls = parse_calls(reply)
    assert (content or None) == whole_content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole_calls
    ]


def test_text_after_a_llama3_call_and_a_semicolon_streams_at_once():
    """After "<call>;" only "{" could begin another call: other text goes out as it comes, not at the end."""
    stream = ToolCallStream(plan([WEATHER, TIME], "auto", None))
    deltas = stream.feed('{"name": "get_time", "parameters": {}}; and') + stream.feed(" more")
    assert deltas[0]["tool_calls"][0]["function"]["name"] == "get_time"
    assert [d["content"] for d in deltas if "content" in d] == [" and", " more"]
    assert stream.finish() == []
