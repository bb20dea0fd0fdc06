"""Which JSON-schema keywords a constrained request may use: those the grammar engine (xgrammar 0.2.8)
enforces. A keyword it would drop, so that outputs could break the schema, is refused before anything
runs, naming where it is (a JSON pointer), as OpenAI's strict mode and vLLM's xgrammar backend refuse
them. Pure Python: the frontend checks tool schemas with it and the engine checks every JSON schema.

NOTE: the table below was found by compiling each keyword with a violating and a satisfying instance
(the violating one must be refused) on xgrammar 0.2.8:

    dropped whatever surrounds it      not, if/then/else, uniqueItems, contains (min/maxContains),
                                       dependentRequired, dependentSchemas, dependencies, allOf of 2+
    dropped on some types              multipleOf unless the type is integer, the divisor whole and
                                       either no bound or both, at most 9,999 apart (wider ranges leak)
    dropped beside another keyword     minLength/maxLength beside pattern or a format it knows; pattern
                                       beside such a format; propertyNames or patternProperties beside
                                       properties; everything beside $ref, anyOf, oneOf or allOf; all
                                       but type beside const or enum
    dropped as not listed              a required name that properties does not list
    dropped without a type             string and number keywords; object and array keywords unless
                                       properties, items, prefixItems or additionalProperties is there
    enforced as anyOf                  oneOf: accepted only where its branches cannot overlap (their
                                       types differ, or a required property holds different constants,
                                       as in pydantic's discriminated unions)

Formats are enforced as xgrammar knows them (a date's syntax, not its calendar; idn-email, iri and regex
not at all); JSON Schema 2020-12 makes formats annotations, so they are accepted.
"""

from __future__ import annotations

import json
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
# without a type, xgrammar reads a node as an object or array only when one of these is there ...
_IMPLY_TYPE = ("properties", "items", "prefixItems", "additionalProperties")
# ... and otherwise drops these
_OBJECT_OR_ARRAY = ("required", "minProperties", "maxProperties", "propertyNames", "patternProperties",
                    "minItems", "maxItems")  # fmt: skip
MULTIPLE_OF_MAX_RANGE = 9_999
# the formats xgrammar writes a grammar for; beside one of these it drops lengths and patterns (other
# formats it leaves free-form, keeping them)
GRAMMAR_FORMATS = frozenset(
    ("email", "date", "time", "date-time", "duration", "uri", "uri-reference", "uri-template", "uuid",
     "ipv4", "ipv6", "hostname", "json-pointer", "relative-json-pointer")
)  # fmt: skip
# objects and lists inside a schema, counted from its root: deeper ones are refused before the recursive
# checks (jsonschema's, these, the grammar compiler's) would run out of stack on them
MAX_SCHEMA_DEPTH = 64


class UnsupportedSchemaError(ValueError):
    def __init__(self, pointer: str, message: str):
        self.pointer, self.message = pointer or "/", message
        super().__init__(f"not supported at {self.pointer}: {message}")


def subschemas(schema: Any, pointer: str = "") -> Iterator[tuple[dict, str]]:
    """Every object (sub)schema of ``schema`` with its JSON pointer, parents first. Values of keywords
    that are not schemas (enum, const, default, examples, required) are not entered."""
    for node, where, _ in _walk(schema, pointer, None):
        yield node, where


def _walk(schema: Any, pointer: str, via: str | None) -> Iterator[tuple[dict, str, str | None]]:
    """``subschemas`` with the keyword each was reached by (``properties`` for a property's schema)."""
    if not isinstance(schema, Mapping):
        return
    yield schema, pointer, via  # type: ignore[misc]
    for key, value in schema.items():
        where = f"{pointer}/{_escape(key)}"
        if key in _ONE and isinstance(value, Mapping):
            yield from _walk(value, where, key)
        elif key in _LIST and isinstance(value, list):
            for i, item in enumerate(value):
                yield from _walk(item, f"{where}/{i}", key)
        elif key in _MAP and isinstance(value, Mapping):
            for name, item in value.items():
                yield from _walk(item, f"{where}/{_escape(name)}", key)


def check_enforceable(schema: Any) -> None:
    """Raises UnsupportedSchemaError for the first keyword the grammar would not enforce. The schema's
    depth is bounded where it enters (``StructuredOutputsParams``, ``validate_tools``: MAX_SCHEMA_DEPTH)."""
    for node, pointer, via in _walk(schema, "", None):
        problem = _problem(node, names=via == "propertyNames")
        if problem is None and isinstance(node.get("oneOf"), list):
            problem = _overlap(node["oneOf"], schema)
        if problem is not None:
            raise UnsupportedSchemaError(pointer, problem)


def deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and lists nest more than ``limit`` levels in ``value`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


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
        low = _first(node, "minimum", "exclusiveMinimum")
        high = _first(node, "maximum", "exclusiveMaximum")
        if (low is None) != (high is None):
            return "multipleOf with only one bound is not enforced; give both or list the values in an enum"
        if low is not None and high - low > MULTIPLE_OF_MAX_RANGE:
            return f"multipleOf over a range wider than {MULTIPLE_OF_MAX_RANGE:,} is not enforced"
    known_format = node.get("format") in GRAMMAR_FORMATS
    if ("pattern" in node or known_format) and ("minLength" in node or "maxLength" in node):
        other = "pattern" if "pattern" in node else f"format {node['format']!r}"
        return f"minLength/maxLength together with {other} is not enforced; put the length in a pattern"
    if "pattern" in node and known_format:
        return f"pattern together with format {node['format']!r} is not enforced (the format wins); keep one"
    required = node.get("required")
    if isinstance(required, list):
        properties = node.get("properties") if isinstance(node.get("properties"), Mapping) else {}
        unlisted = [name for name in required if name not in properties]
        if unlisted:
            return f"required names {unlisted[0]!r}, which properties does not list (not enforced then)"
    for key in ("propertyNames", "patternProperties"):
        if key in node and "properties" in node:
            return f"{key} together with properties is not enforced for the listed properties"
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
        if not any(k in node for k in _IMPLY_TYPE):
            loose += [k for k in _OBJECT_OR_ARRAY if k in node]
        if loose:
            return f'{loose[0]} needs a "type" here (without one it is not enforced)'
    return None


def _overlap(branches: list, root: Any) -> str | None:
    """Why two branches of a oneOf may both match (xgrammar enforces oneOf as anyOf), or None. Each
    branch is read once (its types, its required properties' constants), then compared pairwise."""
    facts = [_branch_facts(_resolve(branch, root), root) for branch in branches]
    for i, first in enumerate(facts):
        for j in range(i + 1, len(facts)):
            if not _disjoint(first, facts[j]):
                return (
                    f"oneOf branches {i} and {j} may both match, and the grammar enforces oneOf as anyOf; "
                    "use anyOf, or tell them apart by type or by a required property's const"
                )
    return None


def _branch_facts(node: Any, root: Any) -> tuple[set[str] | None, dict[str, set[str]]]:
    """A branch's JSON types (None: not plain) and, per required property held to constants, those."""
    constants: dict[str, set[str]] = {}
    if isinstance(node, Mapping):
        properties = node.get("properties") or {}
        for name in node.get("required") or []:
            values = _constants(_resolve(properties.get(name), root)) if isinstance(name, str) else None
            if values is not None:
                constants[name] = values
    return _kinds(node, root), constants


def _disjoint(a: tuple[set[str] | None, dict], b: tuple[set[str] | None, dict]) -> bool:
    (kinds_a, constants_a), (kinds_b, constants_b) = a, b
    if kinds_a is not None and kinds_b is not None and not _types_meet(kinds_a, kinds_b):
        return True
    return any(not values & constants_b[name] for name, values in constants_a.items() if name in constants_b)


def _kinds(node: Any, root: Any, depth: int = 0) -> set[str] | None:
    """The JSON types ``node`` allows, or None where that is not plain from the node."""
    node = _resolve(node, root)
    if node is False:
        return set()
    if not isinstance(node, Mapping) or depth > 8:
        return None
    if "const" in node:
        return {_json_type(node["const"])}
    if isinstance(node.get("enum"), list):
        return {_json_type(value) for value in node["enum"]}
    if _types(node):
        return _types(node)
    for key in ("anyOf", "oneOf"):
        if isinstance(node.get(key), list):
            parts = [_kinds(part, root, depth + 1) for part in node[key]]
            return None if any(p is None for p in parts) else set().union(*parts)
    if any(k in node for k in ("properties", "additionalProperties")):
        return {"object"}
    if any(k in node for k in ("items", "prefixItems")):
        return {"array"}
    return None


def _types_meet(a: set[str], b: set[str]) -> bool:
    return bool(_widen(a) & _widen(b))


def _widen(kinds: set[str]) -> set[str]:
    return kinds | {"integer"} if "number" in kinds else kinds


def _constants(node: Any) -> set[str] | None:
    """The values a node allows, as canonical JSON text, where it is a const or an enum; else None."""
    if not isinstance(node, Mapping):
        return None
    if "const" in node:
        return {_dumps(node["const"])}
    if isinstance(node.get("enum"), list):
        return {_dumps(value) for value in node["enum"]}
    return None


def _resolve(node: Any, root: Any, depth: int = 0) -> Any:
    """Follows a local ``$ref`` (#, #/$defs/..., any JSON pointer into the root); other nodes as they are."""
    while isinstance(node, Mapping) and isinstance(node.get("$ref"), str) and depth < 8:
        ref, depth = node["$ref"], depth + 1
        if not ref.startswith("#"):
            return node
        node = root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
    return node


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _first(node: Mapping, *keys: str) -> float | None:
    numbers = (
        node[k] for k in keys if isinstance(node.get(k), (int, float)) and not isinstance(node[k], bool)
    )
    return next(numbers, None)


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
