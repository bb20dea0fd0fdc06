"""Which JSON-schema keywords a constrained request may use: those the grammar engine (xgrammar 0.2.8)
enforces. A keyword it would drop, so that outputs could break the schema, is refused before anything
runs, naming where it is (a JSON pointer), as OpenAI's strict mode and vLLM's xgrammar backend refuse
them. Pure Python: the frontend checks tool schemas with it and the engine checks every JSON schema.

NOTE: the table below was found by compiling each keyword with a violating and a satisfying instance
(the violating one must be refused) on xgrammar 0.2.8:

    dropped whatever surrounds it      not, if/then/else, uniqueItems, contains (min/maxContains),
                                       dependentRequired, dependentSchemas, dependencies, allOf of 2+
    dropped on some types              multipleOf unless the type is integer, the divisor whole and
                                       no minimum or maximum is given (xgrammar enforces it with some
                                       ranges, not all)
    dropped beside another keyword     minLength/maxLength beside pattern or format; everything beside
                                       $ref, anyOf, oneOf or allOf; all but type beside const or enum
    dropped without a type             string and number keywords (object and array ones imply theirs)

``oneOf`` is enforced as ``anyOf`` (an output may match several branches): accepted, as vLLM does,
because pydantic's discriminated unions use it with branches that cannot overlap.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# keywords whose value is one schema, a list of schemas, or a map of names to schemas
_ONE = ("items", "additionalItems", "additionalProperties", "contains", "propertyNames", "not", "if",
        "then", "else", "unevaluatedItems", "unevaluatedProperties")  # fmt: skip
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")

NEVER_ENFORCED = {
    "not": "not",
    "if": "if/then/else",
    "contains": "contains",
    "minContains": "minContains",
    "maxContains": "maxContains",
    "dependentRequired": "dependentRequired",
    "dependentSchemas": "dependentSchemas",
    "dependencies": "dependencies",
}
STRING_KEYWORDS = ("minLength", "maxLength", "pattern", "format")
NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
# keywords that constrain an instance (the rest, such as title, description, default, are annotations)
ASSERTIONS = frozenset(
    (*STRING_KEYWORDS, *NUMBER_KEYWORDS, *NEVER_ENFORCED, "type", "enum", "const", "items",
     "prefixItems", "additionalItems", "unevaluatedItems", "minItems", "maxItems", "uniqueItems",
     "properties", "patternProperties", "additionalProperties", "unevaluatedProperties", "propertyNames",
     "required", "minProperties", "maxProperties", "allOf", "anyOf", "oneOf", "then", "else", "$ref")
)  # fmt: skip
_LEADERS = ("$ref", "const", "enum", "anyOf", "oneOf", "allOf")  # xgrammar reads these alone


class UnsupportedSchemaError(ValueError):
    def __init__(self, pointer: str, message: str):
        self.pointer, self.message = pointer or "/", message
        super().__init__(f"not supported at {self.pointer}: {message}")


def subschemas(schema: Any, pointer: str = "") -> Iterator[tuple[dict, str]]:
    """Every object (sub)schema of ``schema`` with its JSON pointer, parents first. Values of keywords
    that are not schemas (enum, const, default, examples, required) are not entered."""
    if not isinstance(schema, Mapping):
        return
    yield schema, pointer  # type: ignore[misc]
    for key, value in schema.items():
        where = f"{pointer}/{_escape(key)}"
        if key in _ONE and isinstance(value, Mapping):
            yield from subschemas(value, where)
        elif key in _LIST and isinstance(value, list):
            for i, item in enumerate(value):
                yield from subschemas(item, f"{where}/{i}")
        elif key in _MAP and isinstance(value, Mapping):
            for name, item in value.items():
                yield from subschemas(item, f"{where}/{_escape(name)}")


def check_enforceable(schema: Any) -> None:
    """Raises UnsupportedSchemaError for the first keyword the grammar would not enforce."""
    for node, pointer in subschemas(schema):
        problem = _problem(node, names=pointer.endswith("/propertyNames"))
        if problem is not None:
            raise UnsupportedSchemaError(pointer, problem)


def _problem(node: Mapping, names: bool) -> str | None:
    """``names``: the schema of property names (strings, so it needs no type)."""
    for key, name in NEVER_ENFORCED.items():
        if key in node:
            return f"{name} is not enforced by the grammar engine"
    if node.get("uniqueItems") is True:
        return "uniqueItems is not enforced by the grammar engine"
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        return "allOf with more than one schema is not enforced by the grammar engine; merge them"
    if "multipleOf" in node:
        if not (_types(node) - {"null"} == {"integer"} and _whole(node["multipleOf"])):
            return 'multipleOf is enforced only with a whole divisor on "type": "integer"'
        bound = next((k for k in NUMBER_KEYWORDS if k != "multipleOf" and k in node), None)
        if bound is not None:
            return f"multipleOf together with {bound} is not enforced; list the values in an enum"
    if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
        other = "pattern" if "pattern" in node else "format"
        return f"minLength/maxLength together with {other} is not enforced; put the length in a pattern"
    leaders = [key for key in _LEADERS if key in node]
    if leaders:
        allowed = {leaders[0], "$defs", "definitions"}
        if leaders[0] in ("const", "enum"):
            allowed.add("type")
            values = [node["const"]] if leaders[0] == "const" else node.get("enum") or []
            types = _types(node)
            if types and not all(_of_type(v, types) for v in values):
                return f'{leaders[0]} holds a value that is not of "type" {sorted(types)}'
        beside = sorted(k for k in node if k in ASSERTIONS and k not in allowed)
        if beside:
            return f"{beside[0]} beside {leaders[0]} is not enforced; move it into its schemas"
    elif "type" not in node and not names:
        loose = [k for k in (*STRING_KEYWORDS, *NUMBER_KEYWORDS) if k in node]
        if loose:
            return f'{loose[0]} needs a "type" here (without one it is not enforced)'
    return None


def _types(node: Mapping) -> set[str]:
    value = node.get("type")
    if isinstance(value, str):
        return {value}
    return {t for t in value if isinstance(t, str)} if isinstance(value, list) else set()


def _of_type(value: Any, types: set[str]) -> bool:
    kind = _json_type(value)
    return kind in types or (kind == "integer" and "number" in types)


def _whole(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _escape(key: str) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")
