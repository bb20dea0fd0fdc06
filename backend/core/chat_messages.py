"""Chat conversations as requests carry them, validated (no tokenizer needed: the frontend uses this too).

A conversation is a list of ``{"role": ..., "content": ...}`` messages as OpenAI's chat API sends them;
content is a string or a list of ``{"type": "text", "text": ...}`` parts (joined with newlines, as vLLM
does). Every problem is reported as an InvalidRequestError naming the message and field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pagetron.backend.core.errors import InvalidRequestError

ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_KEYS = {"role", "content", "name", "tool_call_id"}
# what an assistant message of OpenAI's (or of our own) responses carries: replayed into the next turn,
# they mean nothing while null or empty
_NEUTRAL_WHEN_EMPTY = {"refusal", "annotations", "audio", "function_call", "tool_calls"}

Message = dict[str, str]


def validate_messages(messages: Any) -> list[Message]:
    """Plain ``{"role", "content"[, "name"]}`` dicts with string content; raises InvalidRequestError."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of messages")
    clean = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidRequestError(where, f"must be an object, got {type(message).__name__}")
        given = {k for k, v in message.items() if not (k in _NEUTRAL_WHEN_EMPTY and v in (None, [], ""))}
        unknown = given - _MESSAGE_KEYS
        if unknown:
            raise InvalidRequestError(
                f"{where}.{sorted(unknown)[0]}", "is not supported (messages take role, content and name)"
            )
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"{where}.role", f"must be one of {', '.join(ROLES)}; got {role!r}")
        entry = {"role": role, "content": _content(message.get("content"), f"{where}.content")}
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None:
                entry[key] = _text(message[key], f"{where}.{key}")
        clean.append(entry)
    return clean


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return _text(content, where)
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidRequestError(f"{where}[{j}]", f"only text parts are supported; got {kind!r}")
            texts.append(_text(part.get("text"), f"{where}[{j}].text"))
        return "\n".join(texts)
    raise InvalidRequestError(
        where, f"must be a string or a list of text parts; got {type(content).__name__}"
    )


def utf8_problem(text: str) -> str | None:
    """Why ``text`` cannot go to the tokenizer, or None: JSON may carry lone surrogates ("\\udfff"),
    which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode text ({e.reason} at character {e.start})"
    return None


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(where, f"must be a string, got {type(value).__name__}")
    problem = utf8_problem(value)
    if problem is not None:
        raise InvalidRequestError(where, problem)
    return value
