"""Which JSON-schema keywords a constrained request may use (core.json_schema), checked against the real
grammar engine: every keyword refused is one xgrammar lets a violating instance through, every schema
accepted refuses its violating instance. And the short-string rewrite (engine.grammar) allows exactly
the strings xgrammar's maxLength allows, less raw control characters."""

from __future__ import annotations

import json

import jsonschema
import pytest
import xgrammar
from hypothesis import given, settings
from hypothesis import strategies as st
from xgrammar.testing import _is_grammar_accept_string

from pagetron.backend.core.json_schema import UnsupportedSchemaError, check_enforceable, subschemas
from pagetron.backend.engine.grammar import short_strings_as_patterns


def accepts(schema: dict, instance) -> bool:
    grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema))
    return _is_grammar_accept_string(grammar, json.dumps(instance, separators=(",", ":")))


INT_OR_STR = {"type": ["integer", "string"]}
# (schema, an instance that breaks it, where and why it is refused)
REFUSED = [
    ({"type": "number", "multipleOf": 0.5}, 0.3, "/", "multipleOf is enforced only"),
    ({"type": "integer", "multipleOf": 0.5}, 3, "/", "multipleOf is enforced only"),
    ({"type": "integer", "multipleOf": 3, "maximum": 9}, 1, "/", "multipleOf with only one bound"),
    ({"type": "integer", "multipleOf": 3, "minimum": 0, "maximum": 10**4}, 1, "/", "wider than 9,999"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 1], "/", "uniqueItems"),
    ({"type": "array", "items": INT_OR_STR, "contains": {"type": "integer"}}, ["a"], "/", "contains"),
    (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "dependentRequired": {"a": ["b"]},
        },
        {"a": 1},
        "/",
        "dependentRequired",
    ),  # fmt: skip
    ({"not": {"type": "string"}}, "x", "/", "not is not enforced"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, 2, "/", "allOf with more than one schema"),
    ({"if": {"type": "integer"}, "then": {"minimum": 3}}, 2, "/", "if/then/else"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "abcdef", "/", "together with pattern"),
    ({"type": "string", "enum": ["abc"], "maxLength": 2}, "abc", "/", "maxLength beside enum"),
    ({"const": "abc", "maxLength": 2}, "abc", "/", "maxLength beside const"),
    ({"anyOf": [INT_OR_STR], "minimum": 3}, 2, "/", "minimum beside anyOf"),
    ({"type": "integer", "anyOf": [{"minimum": 3}, {"maximum": -3}]}, 0, "/", "type beside anyOf"),
    (
        {"$ref": "#/$defs/s", "maxLength": 2, "$defs": {"s": {"type": "string"}}},
        "abc",
        "/",
        "maxLength beside $ref",
    ),  # fmt: skip
    ({"maxLength": 2}, "abc", "/", 'maxLength needs a "type"'),
    (
        {"type": "object", "properties": {"propertyNames": {"pattern": "^a"}}, "required": ["propertyNames"]},
        {"propertyNames": 5},
        "/properties/propertyNames",
        'pattern needs a "type"',
    ),  # a property, not names
    ({"minItems": 2}, [1], "/", 'minItems needs a "type"'),
    ({"required": ["a"]}, {}, "/", "required names 'a', which properties does not list"),
    (
        {
            "type": "object",
            "properties": {"a": {"type": "string"}},
            "required": ["a", "b"],
            "additionalProperties": True,
        },
        {"a": "x"},
        "/",
        "required names 'b'",
    ),  # fmt: skip
    (
        {"type": "object", "properties": {"cc": {"type": "string"}}, "propertyNames": {"maxLength": 1}},
        {"cc": "x"},
        "/",
        "propertyNames together with properties",
    ),  # fmt: skip
    (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "patternProperties": {"^a": {"type": "integer", "minimum": 5}},
        },
        {"a": 1},
        "/",
        "patternProperties together with properties",
    ),  # fmt: skip
    (
        {"type": "string", "format": "date", "pattern": "^2020"},
        "2021-01-01",
        "/",
        "pattern together with format",
    ),
    (
        {"type": "string", "format": "date-time", "maxLength": 20},
        "2020-01-01T10:00:00.5Z",
        "/",
        "together with format 'date-time'",
    ),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, 1, "/", "oneOf branches 0 and 1 may both match"),
    (
        {
            "type": "object",
            "required": ["p"],
            "properties": {
                "p": {
                    "oneOf": [
                        {"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"type": "object", "properties": {"b": {"type": "integer"}}},
                    ]
                }
            },
        },
        {"p": {}},
        "/properties/p",
        "oneOf branches 0 and 1 may both match",
    ),  # fmt: skip
    ({"minimum": 3}, 2, "/", 'minimum needs a "type"'),
    (
        {
            "type": "object",
            "properties": {"tags": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}},
            "required": ["tags"],
        },
        {"tags": [1, 1]},
        "/properties/tags",
        "uniqueItems",
    ),  # fmt: skip
    (
        {
            "$ref": "#/$defs/pair",
            "$defs": {"pair": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}},
        },
        [2, 2],
        "/$defs/pair",
        "uniqueItems",
    ),  # fmt: skip
    ({"type": "object", "properties": {"a/b~": {"not": {}}}}, {"a/b~": 1}, "/properties/a~1b~0", "not"),
]
# (schema, an instance that breaks it): enforced, so accepted
ENFORCED = [
    ({"type": "integer", "multipleOf": 3}, 4),
    ({"type": ["integer", "null"], "multipleOf": 3}, 4),
    ({"type": "integer", "multipleOf": 7, "minimum": 0, "maximum": 9_999}, 9_998),
    ({"type": "integer", "multipleOf": 2, "exclusiveMinimum": 0, "exclusiveMaximum": 10}, 0),
    ({"minProperties": 1, "additionalProperties": True}, {}),
    ({"minItems": 2, "items": {"type": "integer"}}, [1]),
    (
        {"type": "object", "patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": True},
        {"x": "s"},
    ),  # fmt: skip
    ({"oneOf": [{"type": "string"}, {"type": "null"}]}, 1),
    (
        {
            "oneOf": [{"$ref": "#/$defs/cat"}, {"$ref": "#/$defs/dog"}],
            "$defs": {
                "cat": {
                    "type": "object",
                    "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                    "required": ["kind", "lives"],
                },
                "dog": {
                    "type": "object",
                    "properties": {"kind": {"enum": ["dog", "wolf"]}},
                    "required": ["kind"],
                },
            },
        },
        {"kind": "cat"},
    ),  # fmt: skip
    ({"type": "number", "exclusiveMinimum": 0}, 0),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 2}, [1, 2, 3]),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": False}, [1, "a"]),
    ({"type": "object", "additionalProperties": True, "minProperties": 2}, {"a": 1}),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, {"b": 1}),
    (
        {
            "type": "object",
            "properties": {"propertyNames": {"type": "string", "pattern": "^a"}},
            "required": ["propertyNames"],
        },
        {"propertyNames": "b"},
    ),  # a property of that name: typed, fine
    ({"type": "object", "properties": {"not": {"type": "integer"}}, "required": ["not"]}, {"not": "x"}),
    ({"type": "string", "minLength": 2, "maxLength": 3}, "abcd"),
    ({"type": "string", "format": "date"}, "2020-01-0x"),
    ({"type": "string", "format": "password", "maxLength": 3}, "aaaaaaa"),  # a format it leaves free-form
    ({"type": "string", "format": "made-up", "pattern": "^a+$"}, "bbb"),
    ({"enum": [1, "a", None]}, 2),
    ({"type": "string", "enum": ["a", "b"]}, "c"),
    ({"allOf": [{"type": "integer"}]}, "x"),
    ({"oneOf": [{"type": "string", "maxLength": 2}, {"type": "null"}]}, "abc"),
    ({"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Note", "default": None}, 1),
    ({"$ref": "#/$defs/x", "description": "an x", "$defs": {"x": {"type": "integer"}}}, "a"),
    ({"properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"a": "x"}),
]


@pytest.mark.parametrize(("schema", "bad", "pointer", "words"), REFUSED)
def test_a_keyword_the_grammar_drops_is_refused_where_it_is(schema, bad, pointer, words):
    assert accepts(schema, bad), "xgrammar enforces this now: take it off the refused list"
    with pytest.raises(UnsupportedSchemaError) as e:
        check_enforceable(schema)
    assert e.value.pointer == pointer and words in e.value.message, str(e.value)
    assert str(e.value).startswith(f"not supported at {pointer}: ")


@pytest.mark.parametrize(("schema", "bad"), ENFORCED)
def test_a_schema_accepted_is_one_the_grammar_enforces(schema, bad):
    check_enforceable(schema)
    assert not accepts(schema, bad)


def test_subschemas_enter_schemas_only():
    schema = {
        "type": "object",
        "properties": {"not": {"type": "integer"}, "x": {"anyOf": [{"type": "string"}, True]}},
        "default": {"not": {"minimum": 1}},
        "enum": [{"allOf": []}],
        "$defs": {"d": {"items": {"type": "null"}}},
    }
    pointers = ["", "/properties/not", "/properties/x", "/properties/x/anyOf/0", "/$defs/d", "/$defs/d/items"]
    assert [pointer for _, pointer in subschemas(schema)] == pointers


def test_a_pydantic_schema_is_accepted():
    pydantic = pytest.importorskip("pydantic")
    from typing import Literal

    class Line(pydantic.BaseModel):
        sku: str = pydantic.Field(max_length=12, description="stock unit")
        quantity: int = pydantic.Field(ge=1, le=99)
        pack: int = pydantic.Field(multiple_of=6, ge=6, le=600)

    class Cat(pydantic.BaseModel):
        kind: Literal["cat"]
        lives: int

    class Dog(pydantic.BaseModel):
        kind: Literal["dog"]

    class Order(pydantic.BaseModel):
        id: str = pydantic.Field(pattern=r"^ORD-\d{6}$")
        lines: list[Line]
        note: str | None = None
        pet: Cat | Dog = pydantic.Field(discriminator="kind")

    check_enforceable(Order.model_json_schema())


# ---- short strings as patterns ----------------------------------------------------------------------------
def test_short_strings_become_patterns_and_the_rest_stays():
    schema = {
        "type": "object",
        "properties": {
            "sku": {"type": "string", "maxLength": 12},
            "code": {"type": "string", "minLength": 2, "maxLength": 4, "description": "d"},
            "long": {"type": "string", "maxLength": 129},
            "open": {"type": "string", "minLength": 3},
            "typed": {"type": "string", "maxLength": 4, "pattern": "^a+$"},
            "choice": {"type": "string", "maxLength": 4, "enum": ["ab"]},
            "empty": {"type": "string", "minLength": 5, "maxLength": 2},
            "nullable": {"type": ["string", "null"], "maxLength": 4},
        },
    }
    original = json.loads(json.dumps(schema))
    out = short_strings_as_patterns(schema)
    assert schema == original
    char = (
        r"(?:[\x20\x21\x23-\x5B\x5D-\x7F]|[\u0080-\u07FF]|[\u0800-\uD7FF]|[\uE000-\uFFFF]"
        r"|[\u{10000}-\u{10FFFF}])"
    )
    assert out["properties"]["sku"] == {"type": "string", "pattern": f"^{char}{{0,12}}$"}
    assert out["properties"]["code"] == {"type": "string", "description": "d", "pattern": f"^{char}{{2,4}}$"}
    for unchanged in ("long", "open", "typed", "choice", "empty", "nullable"):
        assert out["properties"][unchanged] == schema["properties"][unchanged]


def test_only_the_eight_shortest_distinct_long_bounds_become_patterns():
    """Each distinct bound is a regular expression to compile: past 16 characters a schema gets 8 of them
    (the shortest), equal bounds sharing one; up to 16 every string is rewritten."""
    highs = [130, 120, 17, 90, 90, 60, 50, 40, 30, 20, 100, 110, 16, 3]
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": h}
                                               for i, h in enumerate(highs)}}  # fmt: skip
    out = short_strings_as_patterns(schema)["properties"]
    as_patterns = sorted(highs[i] for i in range(len(highs)) if "pattern" in out[f"p{i}"])
    assert as_patterns == [3, 16, 17, 20, 30, 40, 50, 60, 90, 90, 100]  # not 110, 120; 130 is past 128


@pytest.mark.parametrize(("low", "high"), [(0, 1), (0, 4), (2, 4), (4, 4), (0, 40), (3, 60), (0, 128)])
def test_a_short_string_pattern_allows_what_max_length_allows_less_control_characters(low, high):
    """Both spellings, compiled by xgrammar, over strings made of plain and multi-byte characters, quotes,
    escapes and control characters, of every length up to one past the bound (short bounds) or of the
    lengths around each bound and one between (long ones)."""
    spelled = {"type": "string", "minLength": low, "maxLength": high}
    rewritten = short_strings_as_patterns(spelled)
    assert "pattern" in rewritten
    grammars = [xgrammar.Grammar.from_json_schema(json.dumps(s)) for s in (spelled, rewritten)]
    checked = 0
    for piece in ["a", "é", "😀", "-", " ", '\\"', "\\n", "\\u00e9", '"', "\\", "\t", "\x01", "\x7f"]:
        lengths = range(max(0, low - 1), high + 2)
        if high > 8:
            around = (low - 1, low, low + 1, (low + high) // 2, high - 1, high, high + 1)
            lengths = sorted({n for n in around if n >= 0})
        for n in lengths:
            text = f'"{"x" * max(0, n - 1)}{piece if n else ""}"'
            by_length, by_pattern = (_is_grammar_accept_string(g, text) for g in grammars)
            raw_control = n > 0 and piece in ("\t", "\x01")
            assert by_pattern == (by_length and not raw_control), (piece, n, by_length, by_pattern)
            checked += by_pattern
    assert checked > 0


# ---- the property: a schema accepted is enforced -----------------------------------------------------------
CANDIDATES = [None, True, 0, 1, 2, 3, 6, 7, 12, -3, 0.5, 2.5, "", "a", "ab", "aaaa", "b", "2020-01-01",
              [], [1], [1, 1], [1, 2, 3], ["a", 1], {}, {"a": 1}, {"a": "x"}, {"b": 1}, {"a": 1, "b": 2},
              {"a": [1, 1]}, {"a": {"a": 1}}]  # fmt: skip
_numbers = st.fixed_dictionaries(
    {"type": st.sampled_from(["integer", "number"])},
    optional={k: st.integers(-2, 8) for k in ("minimum", "maximum", "exclusiveMinimum", "multipleOf")},
)
_strings = st.fixed_dictionaries(
    {"type": st.just("string")},
    optional={
        "minLength": st.integers(0, 3),
        "maxLength": st.integers(0, 3),
        "pattern": st.just("^a*$"),
        "format": st.sampled_from(["date", "password"]),
    },  # fmt: skip
)
_leaves = st.one_of(
    _numbers, _strings, st.just({"type": "boolean"}), st.just({"type": "null"}),
    st.builds(lambda v: {"enum": v}, st.lists(st.sampled_from([1, "a", None, 2]), min_size=1, max_size=3)),
)  # fmt: skip


def _containers(inner):
    return st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("array"), "items": inner},
            optional={
                "minItems": st.integers(0, 2),
                "maxItems": st.integers(0, 2),
                "uniqueItems": st.booleans(),
            },
        ),
        st.fixed_dictionaries(
            {
                "type": st.just("object"),
                "properties": st.fixed_dictionaries({"a": inner}, optional={"b": inner}),
            },
            optional={
                "required": st.sampled_from([["a"], ["a", "b"], []]),
                "additionalProperties": st.booleans(),
                "minProperties": st.integers(0, 2),
            },
        ),  # fmt: skip
        st.builds(lambda xs: {"anyOf": xs}, st.lists(inner, min_size=1, max_size=2)),
        st.builds(lambda xs: {"oneOf": xs}, st.lists(inner, min_size=1, max_size=2)),
        st.builds(lambda x: {"allOf": [x]}, inner),
        st.builds(lambda x: {"not": x}, inner),
    )


@settings(max_examples=150, deadline=None)
@given(st.recursive(_leaves, _containers, max_leaves=4))
def test_what_the_check_accepts_the_grammar_enforces(schema):
    """Over random schemas of these keywords: if check_enforceable accepts one, no candidate instance that
    xgrammar accepts breaks it (jsonschema says so)."""
    try:
        check_enforceable(schema)
        jsonschema.validators.validator_for(schema).check_schema(schema)
        grammar = xgrammar.Grammar.from_json_schema(json.dumps(short_strings_as_patterns(schema)))
    except (UnsupportedSchemaError, jsonschema.SchemaError, RuntimeError):
        return  # refused: by the check, as invalid, or by xgrammar itself (loudly)
    for instance in CANDIDATES:
        if _is_grammar_accept_string(grammar, json.dumps(instance, separators=(",", ":"))):
            assert jsonschema.Draft202012Validator(schema).is_valid(instance), (schema, instance)
