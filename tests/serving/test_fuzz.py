"""Fuzzing the served model (a tiny model with SmolLM2's tokenizer: input handling is under test).
Hypothesis generates sampling_parameters (JSON of any shape: wrong types, huge and negative numbers, NaN,
nested junk, unknown keys, or not JSON at all) and prompts (text with control characters, invalid UTF-8,
empty, token ids out of range, 1 MB strings). Every reply is a valid output or INVALID_ARG, the server
never goes down, and the number of inputs tried is printed."""

from __future__ import annotations

import json
import math
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpc_helpers import stream_generate

SAMPLING_KEYS = [
    "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop",
    "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "logprobs", "skip_special_tokens", "include_stop_str_in_output", "lora_name",
]  # fmt: skip
# Valid values this large would make a case run for seconds; smaller ones keep the run short.
LONG_RUNNING = {"max_tokens": 8, "min_tokens": 8, "n": 3, "logprobs": 5}
EXAMPLES = int(os.environ.get("PAGETRON_FUZZ_EXAMPLES", "300"))  # `make soak` runs 1,000

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["1", "0.5", "-3", "nan", "inf", "1e400", "/etc/passwd", "../../x"]),
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
sampling_dicts = st.dictionaries(
    st.one_of(st.sampled_from(SAMPLING_KEYS), st.text(max_size=12)), json_values, max_size=6
)
sampling = st.one_of(
    st.none(),
    sampling_dicts,
    st.text(max_size=40),  # not JSON, or JSON that is not an object
    st.sampled_from(["[]", "null", "1", '{"max_tokens": 2', '{"max_tokens": NaN}', "{}" * 1000]),
)
prompts = st.one_of(
    st.text(max_size=200),  # control characters, surrogate-free unicode, empty
    st.binary(max_size=200),  # mostly invalid UTF-8
    st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), max_size=40),  # input_ids
    st.sampled_from(["a" * 1_000_000, "\x00" * 1000, "Hello", " "]),
)


def bounded(params):
    """Caps values that would be valid but slow; everything else goes as generated."""
    if not isinstance(params, dict):
        return params
    out = dict(params)
    for key, cap in LONG_RUNNING.items():
        value = out.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            if cap < value <= 1_000_000:
                out[key] = cap
    if "max_tokens" not in out:
        out["max_tokens"] = 4
    return out


def as_json(params) -> str | None:
    if params is None or isinstance(params, str):
        return params
    return json.dumps(params, allow_nan=True)  # NaN and Infinity as JS literals, which strict JSON refuses


def test_fuzzed_requests_get_output_or_invalid_arg_and_the_server_stays_whole(triton_server):
    tried = {"inputs": 0, "outputs": 0, "invalid": 0}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(prompt=prompts, params=sampling)
    def one(prompt, params):
        tried["inputs"] += 1
        r = stream_generate(triton_server.grpc_url, prompt, as_json(bounded(params)), timeout=60)
        if r.error is None:
            tried["outputs"] += 1
            assert r.finish_reason in ("length", "stop"), r
        else:
            tried["invalid"] += 1
            assert r.error.startswith("[INVALID_ARG] "), (r.error, prompt, params)

    one()
    assert triton_server.process.poll() is None and triton_server.is_ready()
    r = stream_generate(triton_server.grpc_url, "Hello", {"max_tokens": 3, "temperature": 0})
    assert r.error is None and len(r.token_ids) == 3
    print(
        f"\nfuzzing: {tried['inputs']} inputs tried, {tried['outputs']} valid outputs, "
        f"{tried['invalid']} INVALID_ARG, 0 crashes"
    )
    assert tried["inputs"] >= EXAMPLES
