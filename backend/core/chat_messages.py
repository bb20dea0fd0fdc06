"""Chat conversations as requests carry them, validated (no tokenizer needed: the frontend uses this too).

A conversation is a list of ``{"role": ..., "content": ...}`` messages as OpenAI's chat API sends them;
content is a string or a list of ``{"type": "text", "text": ...}`` parts (joined with newlines, as vLLM
does). An assistant message may carry the ``tool_calls`` it made (their JSON arguments reach the chat
template as objects, as templates expect), a ``tool`` message the ``tool_call_id`` it answers. Every
problem is reported as an InvalidRequestError naming the message and field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pagetron.backend.core.errors import InvalidRequestError
from pagetron.backend.core.json_schema import MAX_SCHEMA_DEPTH, deeper_than

ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_KEYS = {"role", "content", "name", "tool_call_id"}
# what an assistant message of OpenAI's (or of our own) responses carries: replayed into the next turn,
# they mean nothing while null or empty
_NEUTRAL_WHEN_EMPTY = {"refusal", "annotations", "audio", "function_call", "tool_calls"}
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names

Message = dict[str, Any]


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
        tool_calls = message.get("tool_calls") if "tool_calls" in given else None
        if tool_calls is not None and message.get("role") == "assistant":
            given.discard("tool_calls")
        unknown = given - _MESSAGE_KEYS
        if unknown:
            raise InvalidRequestError(
                f"{where}.{sorted(unknown)[0]}", "is not supported (messages take role, content and name)"
            )
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"{where}.role", f"must be one of {', '.join(ROLES)}; got {role!r}")
        content = message.get("content")
        if tool_calls is not None and content is None:
            content = ""  # an assistant turn that only called tools
        entry: Message = {"role": role, "content": _content(content, f"{where}.content")}
        if tool_calls is not None:
            entry["tool_calls"] = _tool_calls(tool_calls, f"{where}.tool_calls")
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None:
                entry[key] = _text(message[key], f"{where}.{key}")
        clean.append(entry)
    return clean


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise InvalidRequestError(where, "must be a list of tool calls")
    clean = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or call.get("type", "function") != "function":
            shape = '{"id", "type": "function", "function": {"name", "arguments"}}'
            raise InvalidRequestError(at, f"must be {shape}")
        name = _text(function.get("name"), f"{at}.function.name")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(_text(arguments, f"{at}.function.arguments") or "{}")
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"{at}.function.arguments", f"is not valid JSON: {e}") from None
        entry = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if call.get("id") is not None:
            entry["id"] = _text(call["id"], f"{at}.id")
        clean.append(entry)
    return clean


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's ``tools``: ``[{"type": "function", "function": {"name", "description"?, "parameters"?,
    "strict"?}}]``; names unique and as OpenAI allows them; parameters a JSON schema object."""
    if not isinstance(tools, list) or not tools:
        raise InvalidRequestError("tools", "must be a non-empty list of tools")
    clean, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise InvalidRequestError(f"{where}.type", 'only "function" tools are supported')
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise InvalidRequestError(f"{where}.function", "must be an object with a name")
        unknown = set(function) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise InvalidRequestError(f"{where}.function.{sorted(unknown)[0]}", "is not a function field")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            rule = FUNCTION_NAME.pattern
            raise InvalidRequestError(f"{where}.function.name", f"must match {rule}; got {name!r}")
        if name in names:
            raise InvalidRequestError(f"{where}.function.name", f"{name!r} is given twice")
        names.add(name)
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise InvalidRequestError(f"{where}.function.parameters", "must be a JSON schema object")
        if deeper_than(parameters, MAX_SCHEMA_DEPTH):
            raise InvalidRequestError(
                f"{where}.function.parameters", f"is nested more than {MAX_SCHEMA_DEPTH} levels deep"
            )
        entry = {"name": name, "parameters": dict(parameters)}
        if function.get("description") is not None:
            entry["description"] = _text(function["description"], f"{where}.function.description")
        if function.get("strict") is not None:
            entry["strict"] = bool(function["strict"])
        clean.append({"type": "function", "function": entry})
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
