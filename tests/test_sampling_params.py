import math

import pytest

from pagetron.backend.core.sampling_params import SamplingParams, SamplingParamsError

VALID = [
    ("n", 1),
    ("n", 64),
    ("temperature", 0.0),
    ("temperature", 1e-6),
    ("temperature", 100.0),
    ("top_p", 1e-6),
    ("top_p", 1.0),
    ("top_k", -1),
    ("top_k", 0),
    ("top_k", 1),
    ("top_k", 50_000),
    ("min_p", 0.0),
    ("min_p", 1.0),
    ("seed", None),
    ("seed", 0),
    ("seed", 2**63 - 1),
    ("presence_penalty", -2.0),
    ("presence_penalty", 2.0),
    ("frequency_penalty", -2.0),
    ("frequency_penalty", 2.0),
    ("repetition_penalty", 1e-3),
    ("repetition_penalty", 10.0),
    ("max_tokens", None),
    ("max_tokens", 1),
    ("min_tokens", 0),
    ("min_tokens", 16),
    ("stop", None),
    ("stop", []),
    ("stop", ["a", "\n\n"]),
    ("stop_token_ids", None),
    ("stop_token_ids", [0, 5]),
    ("logprobs", None),
    ("logprobs", 0),
    ("logprobs", 20),
    ("ignore_eos", True),
    ("skip_special_tokens", False),
    ("include_stop_str_in_output", True),
    ("lora_name", None),
]

INVALID = [
    ("n", 0),
    ("n", 65),
    ("n", 1.0),
    ("n", True),
    ("temperature", -1e-9),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("temperature", "0.5"),
    ("top_p", 0.0),
    ("top_p", 1.0 + 1e-9),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", -1e-9),
    ("min_p", 1.0 + 1e-9),
    ("min_p", -math.inf),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.5),
    ("presence_penalty", -2.001),
    ("presence_penalty", 2.001),
    ("frequency_penalty", -2.001),
    ("frequency_penalty", 2.001),
    ("frequency_penalty", math.inf),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.nan),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > max_tokens (16)
    ("stop", [""]),
    ("stop", ["ok", 3]),
    ("stop", 3),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1, "2"]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 7),
    ("logprobs", -1),
    ("logprobs", 21),
    ("ignore_eos", 1),
    ("skip_special_tokens", "yes"),
    ("include_stop_str_in_output", None),
    ("lora_name", ""),
    ("temperature", None),
]


@pytest.mark.parametrize(("field", "value"), VALID)
def test_valid_boundaries(field, value):
    params = SamplingParams(**{field: value})
    assert getattr(params, field) == value


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_boundaries_name_the_field(field, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert repr(field) in str(info.value)


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (
        1,
        1.0,
        1.0,
        -1,
        0.0,
        16,
        0,
    )
    assert p.seed is None and p.stop is None and p.logprobs is None and p.lora_name is None
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output
    assert not p.greedy


def test_min_tokens_with_unbounded_max_tokens():
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000


def test_stop_string_is_wrapped():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_int_given_for_float_field_becomes_float():
    p = SamplingParams(temperature=1, top_p=1)
    assert p.temperature == 1.0 and type(p.temperature) is float and type(p.top_p) is float


@pytest.mark.parametrize(
    ("temperature", "greedy"), [(0.0, True), (9.9e-6, True), (1e-5, False), (0.7, False)]
)
def test_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_greedy_with_n_above_one_is_allowed():
    assert SamplingParams(temperature=0, n=4).greedy


def test_n_cap_message():
    with pytest.raises(SamplingParamsError, match=r"\[1, 64\]"):
        SamplingParams(n=100)


def test_lora_name_is_a_name():
    assert SamplingParams(lora_name="sql-adapter").lora_name == "sql-adapter"  # resolved by the engine
    with pytest.raises(SamplingParamsError, match="an adapter's name"):
        SamplingParams(lora_name=" ")


# ---- from_dict / from_json


def test_from_dict_coerces_strings():
    p = SamplingParams.from_dict(
        {
            "temperature": "0.7",
            "top_p": " 0.9 ",
            "max_tokens": "16",
            "top_k": "-1",
            "seed": "42",
            "logprobs": "3",
            "min_tokens": "2.0",
            "ignore_eos": "true",
            "skip_special_tokens": "False",
            "include_stop_str_in_output": True,
            "stop_token_ids": ["7", 8, 9.0],
            "stop": "END",
        }
    )
    assert p.temperature == 0.7 and p.top_p == 0.9
    assert p.max_tokens == 16 and p.top_k == -1 and p.seed == 42 and p.logprobs == 3 and p.min_tokens == 2
    assert p.ignore_eos is True and p.skip_special_tokens is False and p.include_stop_str_in_output is True
    assert p.stop_token_ids == [7, 8, 9] and p.stop == ["END"]


def test_from_dict_integral_float_for_int_field():
    assert SamplingParams.from_dict({"max_tokens": 32.0}).max_tokens == 32


def test_from_dict_null_for_optional_fields():
    p = SamplingParams.from_dict({"max_tokens": None, "seed": None, "logprobs": None})
    assert p.max_tokens is None and p.seed is None and p.logprobs is None


def test_from_dict_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({"temperature": 1.0, "beam_width": 4})
    assert info.value.field == "beam_width"
    assert (
        "'beam_width'" in str(info.value) and "temperature" in str(info.value) and "top_p" in str(info.value)
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("temperature", [1.0]),
        ("temperature", "abc"),
        ("temperature", True),
        ("temperature", {"a": 1}),
        ("temperature", "nan"),
        ("temperature", "inf"),
        ("top_p", "-inf"),
        ("max_tokens", 1.5),
        ("max_tokens", "1.5"),
        ("max_tokens", "sixteen"),
        ("max_tokens", True),
        ("max_tokens", [16]),
        ("n", False),
        ("n", "2.5"),
        ("seed", "x"),
        ("seed", math.inf),
        ("logprobs", math.nan),
        ("ignore_eos", "yes"),
        ("ignore_eos", 0),
        ("skip_special_tokens", 1.0),
        ("stop", {"a": 1}),
        ("stop", [""]),
        ("stop_token_ids", ["x"]),
        ("stop_token_ids", [1.5]),
        ("stop_token_ids", "5"),
        ("lora_name", 3),
        ("n", None),
        ("top_k", None),
    ],
)
def test_from_dict_wrong_type_names_the_key(key, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_dict({key: value})
    assert info.value.field == key
    assert repr(key) in str(info.value)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(SamplingParamsError):
        SamplingParams.from_dict([("temperature", 1.0)])  # type: ignore[arg-type]


def test_from_json():
    p = SamplingParams.from_json('{"temperature": 0, "max_tokens": "8", "stop": ["\\n"], "seed": 3}')
    assert p == SamplingParams(temperature=0.0, max_tokens=8, stop=["\n"], seed=3)
    assert SamplingParams.from_json(b'{"n": 2}').n == 2
    assert SamplingParams.from_json("{}") == SamplingParams()


@pytest.mark.parametrize("text", ["", "{", "not json", "[1, 2]", '"temperature"', "3", "null", b"\xff\xfe{"])
def test_from_json_errors(text):
    with pytest.raises(SamplingParamsError):
        SamplingParams.from_json(text)


def test_from_json_nan_literal_rejected():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams.from_json('{"top_p": NaN}')
    assert info.value.field == "top_p"


def test_error_is_a_value_error():
    assert issubclass(SamplingParamsError, ValueError)
