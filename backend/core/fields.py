"""Field types of a dataclass, read from its annotations (so no table repeats them)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldType:
    base: type  # int, float, bool, str, list, dict, ...
    optional: bool  # None is allowed


def field_types(cls: type) -> dict[str, FieldType]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        optional = type(None) in args
        if args:
            (hint,) = [a for a in args if a is not type(None)]
        out[f.name] = FieldType(typing.get_origin(hint) or hint, optional)
    return out
