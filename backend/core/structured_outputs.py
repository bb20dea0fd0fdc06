"""What a constrained request asks for (vLLM's ``StructuredOutputsParams``), checked for shape only.

Exactly one constraint per request: ``json`` (a JSON schema, as an object or its JSON text), ``json_object``
(any JSON object or array), ``regex``, ``choice`` (one of a list of strings) or ``grammar`` (EBNF/GBNF).
Whether a schema, regex or grammar is valid is decided where it is compiled (the engine's grammar
service), which names the problem; this module needs neither torch nor the grammar engine, so the
frontend and the request parser use it too.

The grammar state of one sequence lives beside it (``Sequence.grammar``, a ``GrammarState``); the
scheduler only asks it the questions below.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

from pagetron.backend.core.json_schema import MAX_SCHEMA_DEPTH, deeper_than

KINDS = ("json", "json_object", "regex", "choice", "grammar")

# accepted with these values only (older clients send them; each names what Pagetron always does)
_NEUTRAL = {"backend": (None, "auto", "xgrammar"), "disable_fallback": (None, False, True)}


class StructuredOutputsError(ValueError):
    """``field`` is the offending key, as ``structured_outputs.<key>``."""

    def __init__(self, key: str, message: str):
        self.field = f"structured_outputs.{key}" if key else "structured_outputs"
        self.message = message
        super().__init__(f"invalid sampling parameter {self.field!r}: {message}")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | dict | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    # JSON without optional whitespace between tokens (shorter outputs; vLLM's name)
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            got = ", ".join(given) if given else "none"
            raise StructuredOutputsError("", f"give exactly one of {', '.join(KINDS)}; got {got}")
        if self.json_object not in (None, True, False):
            raise StructuredOutputsError("json_object", f"must be a boolean, got {self.json_object!r}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise StructuredOutputsError("disable_any_whitespace", "must be a boolean")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except RecursionError:
                    raise StructuredOutputsError(
                        "json", f"is nested more than {MAX_SCHEMA_DEPTH} levels deep"
                    ) from None
                except ValueError as e:
                    raise StructuredOutputsError("json", f"is not valid JSON: {e}") from None
            else:
                schema = self.json
            if not isinstance(schema, (Mapping, bool)):
                raise StructuredOutputsError("json", "must be a JSON schema (an object)")
            if deeper_than(schema, MAX_SCHEMA_DEPTH):
                raise StructuredOutputsError("json", f"is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        for key in ("regex", "grammar"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise StructuredOutputsError(key, "must be a non-empty string")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise StructuredOutputsError("choice", "must be a non-empty list of strings")
            for c in self.choice:
                if not isinstance(c, str) or not c:
                    raise StructuredOutputsError("choice", f"entries must be non-empty strings, got {c!r}")
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """The constraint's content, canonically: equal keys compile to the same grammar (cache key)."""
        value = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            value = json.loads(value)
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return f"{self.kind}:{int(self.disable_any_whitespace)}:{text}"

    @classmethod
    def from_dict(cls, d: Any) -> StructuredOutputsParams:
        """Strict: an unknown key is an error naming it (untrusted input: Triton's sampling_parameters)."""
        if isinstance(d, StructuredOutputsParams):
            return d
        if not isinstance(d, Mapping):
            raise StructuredOutputsError("", f"must be an object, got {type(d).__name__}")
        valid = [f.name for f in fields(cls)]
        kwargs = {}
        for key, value in d.items():
            if key in _NEUTRAL:
                if value not in _NEUTRAL[key]:
                    raise StructuredOutputsError(str(key), f"{value!r} is not supported (xgrammar is used)")
                continue
            if key not in valid:
                raise StructuredOutputsError(
                    str(key), f"unknown key; valid keys are {', '.join(valid + list(_NEUTRAL))}"
                )
            if value is not None:
                kwargs[key] = value
        return cls(**kwargs)


class GrammarState(Protocol):
    """One sequence's grammar matcher (implemented by the engine's grammar service)."""

    @property
    def ready(self) -> bool:
        """The grammar has compiled (or failed to): the sequence may be scheduled."""

    def accept(self, token_id: int) -> bool:
        """Advances the matcher; False if the grammar does not allow ``token_id``."""

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """Writes the tokens allowed next into row ``row`` of an int32 bitmask array."""

    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
