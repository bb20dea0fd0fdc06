"""Triton request tensors to a generation request: prompt forms, flags, merged sampling parameters."""

import json

import numpy as np
import pytest

from pagetron.backend.core.errors import InvalidRequestError
from pagetron.backend.core.sampling_params import SamplingParamsError
from pagetron.backend.serving.request_parser import parse_request


def text(value: bytes) -> np.ndarray:
    return np.array([value], dtype=np.object_)


def test_sampling_parameters_tensor_wins_over_http_parameters_and_strings_are_numbers():
    parsed = parse_request(
        {
            "text_input": text(b"Hi"),
            "sampling_parameters": text(json.dumps({"max_tokens": "7"}).encode()),
            "stream": np.array([True]),
        },
        json.dumps({"max_tokens": 3, "temperature": "0.5"}),
    )
    assert (parsed.prompt, parsed.stream, parsed.params.max_tokens, parsed.params.temperature) == (
        "Hi",
        True,
        7,
        0.5,
    )


@pytest.mark.parametrize("flag", ["return_logprobs", "return_cumulative_logprob"])
def test_asking_for_logprob_outputs_does_not_turn_on_logprobs(flag):
    """As the vLLM backend: `logprobs` is null and the sum still computed unless the request asks."""
    parsed = parse_request({"input_ids": np.array([5, 6], dtype=np.int32), flag: np.array([True])})
    assert parsed.prompt == [5, 6] and parsed.params.logprobs is None and getattr(parsed, flag)


@pytest.mark.parametrize(
    "stream, exclude, prepended",
    [
        (False, None, True),
        (True, None, False),
        (False, True, False),
        (False, False, True),
        (True, True, False),
    ],
)
def test_the_prompt_is_prepended_unless_streaming_or_excluded(stream, exclude, prepended):
    inputs = {"text_input": np.array([b"Hi"], dtype=object), "stream": np.array([stream])}
    if exclude is not None:
        inputs["exclude_input_in_output"] = np.array([exclude])
    assert parse_request(inputs).exclude_input_in_output is not prepended


def test_streaming_with_the_prompt_in_the_output_is_refused():
    inputs = {"text_input": np.array([b"Hi"], dtype=object), "stream": np.array([True])}
    with pytest.raises(InvalidRequestError) as e:
        parse_request({**inputs, "exclude_input_in_output": np.array([False])})
    assert e.value.field == "exclude_input_in_output" and "When streaming" in e.value.message


def test_bad_inputs_name_the_field():
    with pytest.raises(InvalidRequestError, match="text_input"):
        parse_request({"text_input": text(b"\xff")})
    with pytest.raises(InvalidRequestError, match="text_input"):
        parse_request({})
    with pytest.raises(InvalidRequestError, match="stream"):
        parse_request({"text_input": text(b"Hi"), "stream": np.array([1], dtype=np.int32)})
    with pytest.raises(SamplingParamsError, match="sampling_parameters"):
        parse_request({"text_input": text(b"Hi"), "sampling_parameters": text(b"{no")})
    deep = b"[" * 100_000  # past the JSON parser's recursion: still the field's error
    with pytest.raises(SamplingParamsError, match="sampling_parameters"):
        parse_request({"text_input": text(b"Hi"), "sampling_parameters": text(deep)})
    with pytest.raises(SamplingParamsError, match="parameters"):
        parse_request({"text_input": text(b"Hi")}, deep.decode())
    with pytest.raises(InvalidRequestError, match="^messages: "):
        parse_request({"messages": text(deep)})
    with pytest.raises(InvalidRequestError, match="^tools: "):
        parse_request({"messages": text(b'[{"role": "user", "content": "a"}]'), "tools": text(deep)})


def test_messages_input_is_a_validated_conversation():
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
    ]
    parsed = parse_request({"messages": text(json.dumps(conversation).encode())})
    assert parsed.prompt == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}]
    }


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"messages": text(b"[{")}, "messages"),
        ({"messages": text(b'{"role": "user"}')}, "messages"),
        ({"messages": text(b"[]")}, "messages"),
        (
            {"messages": text(b'[{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]')},
            r"messages\[1\].role",
        ),
        ({"messages": text(b'[{"role": "user", "content": 5}]')}, r"messages\[0\].content"),
        (
            {"messages": text(b'[{"role": "user", "content": "a", "tool_calls": [{"id": "c1"}]}]')},
            r"messages\[0\].tool_calls",
        ),
        (
            {"messages": text(b'[{"role": "user", "content": [{"type": "image_url"}]}]')},
            r"messages\[0\].content\[0\]",
        ),
        ({"messages": text(b"[]"), "text_input": text(b"Hi")}, "messages"),
    ],
)
def test_bad_messages_name_the_message_and_field(inputs, field):
    with pytest.raises(InvalidRequestError, match=f"^{field}: "):
        parse_request(inputs)
