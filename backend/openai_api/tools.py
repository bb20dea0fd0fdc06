"""Tool calling for the chat API: which grammar a ``tool_choice`` needs, and the model's text as OpenAI's
``tool_calls``, whole or streamed.

    tool_choice      grammar (structured_outputs)                       the text is
    "none"           none                                                content
    "auto"           none                                                content and/or calls, parsed below
    "required"       [{"name": <one of the tools>, "parameters": {..}}+]  calls (a JSON array)
    {"function":..}  that function's parameters schema                  that call's arguments

With ``auto`` the model writes calls in its own format, which ``parse_calls`` reads:
    Hermes / Qwen / SmolLM2:  <tool_call>{"name": "f", "arguments": {...}}</tool_call>  (or a JSON list)
    Llama 3:                  {"name": "f", "parameters": {...}}  as the whole reply (optionally after
                              <|python_tag|>; several joined by ";")
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagetron.backend.core.chat_messages import validate_tools
from pagetron.backend.core.errors import InvalidRequestError
from pagetron.backend.core.json_schema import UnsupportedSchemaError, check_enforceable

TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"
MAX_HEAD_CHARS = 512  # a call's head (its name) is looked for this far; past it the call goes whole
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict[str, Any]] = field(default_factory=list)  # validated OpenAI tools
    name: str | None = None  # the named function
    parallel: bool = True

    def structured_outputs(self) -> dict[str, Any] | None:
        """The constraint that makes the reply the calls (required, named), or None."""
        if self.mode == "named":
            return {"json": self._parameters(self.name), "disable_any_whitespace": True}
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["function"]["name"]},
                    "parameters": t["function"]["parameters"],
                },
                "required": ["name", "parameters"],
            }
            for t in self.tools
        ]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            array["maxItems"] = 1
        return {"json": array, "disable_any_whitespace": True}

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        """OpenAI's finish reason for a choice: ``tool_calls`` when it called tools and stopped by itself;
        a forced (named) function "stops", as OpenAI reports it."""
        if engine_reason == "stop" and called and self.mode != "named":
            return "tool_calls"
        return engine_reason

    def _parameters(self, name: str | None) -> dict[str, Any]:
        return next(t["function"]["parameters"] for t in self.tools if t["function"]["name"] == name)


def plan(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan:
    """Checks ``tools`` and ``tool_choice`` (raises InvalidRequestError naming the field)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequestError("tool_choice", "needs tools")
        return ToolPlan("none")
    clean = validate_tools(tools)
    parallel = parallel_tool_calls is not False
    choice = "auto" if tool_choice is None else tool_choice
    if choice in ("none", "auto", "required"):
        if choice == "required":
            _check_enforceable(clean)
        return ToolPlan(choice, clean, parallel=parallel)
    if (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
    ):
        name = choice["function"].get("name")
        if name not in {t["function"]["name"] for t in clean}:
            raise InvalidRequestError("tool_choice", f"names function {name!r}, which is not among the tools")
        _check_enforceable(clean, name)
        return ToolPlan("named", clean, name=name, parallel=parallel)
    raise InvalidRequestError(
        "tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
    )


def _check_enforceable(tools: list[dict[str, Any]], name: str | None = None) -> None:
    """The parameter schemas a required or named choice turns into a grammar use only keywords it
    enforces (``core.json_schema``); an auto choice uses none."""
    for i, tool in enumerate(tools):
        if name is None or tool["function"]["name"] == name:
            try:
                check_enforceable(tool["function"]["parameters"])
            except UnsupportedSchemaError as e:
                raise InvalidRequestError(f"tools[{i}].function.parameters", str(e)) from None


def new_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def calls_from_required(text: str) -> list[dict[str, Any]]:
    """The JSON array a ``required`` grammar produced, as tool calls (nothing if it was cut short)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [_call(item) for item in items if _call(item) is not None]


def parse_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of an ``auto`` reply in any format above; text that is no call stays content.
    A reply that starts with a JSON call is read as Llama 3's (a ``<tool_call>`` inside one of its
    strings is text); otherwise tags are looked for."""
    content, calls = _json_reply_calls(text)
    if calls:
        return content, calls
    if TAG_OPEN not in text:
        return _content(text), []
    return _tagged_calls(text)


def _content(text: str) -> str | None:
    """The reply's text outside its calls, exactly as written (as the stream sends it); None when it is
    only whitespace (the stream holds whitespace back until text follows)."""
    return text if text.strip() else None


def _json_reply_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Llama 3: {...}; {...} (a ";" inside a string is text); the text after the calls (from the end of
    the last one, or from the ";" after which no call follows) is content, as the stream sends it. No
    calls: ``(text, [])``."""
    stripped = text.lstrip().removeprefix(PYTHON_TAG).lstrip()
    calls: list[dict[str, Any]] = []
    start = after = 0
    while stripped.startswith("{", start):
        end = _value_end(stripped, start)
        found = [] if end is None else _calls_in(stripped[start:end])
        if not found:
            break
        calls += found
        rest = stripped[end:].lstrip()
        if not rest.startswith(";"):
            return _content(stripped[end:]), calls
        after = len(stripped) - len(rest) + 1
        start = len(stripped) - len(rest[1:].lstrip())
    if calls:
        return _content(stripped[after:]), calls
    return text, []


def _tagged_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Hermes / Qwen / SmolLM2 tags. A tag's call ends at its ``</tool_call>``, or at the next tag, or
    at the reply's end (as the stream ends it); a tag that holds no call stays text."""
    content, calls, i = [], [], 0
    while (opening := text.find(TAG_OPEN, i)) >= 0:
        content.append(text[i:opening])
        body = opening + len(TAG_OPEN)
        value_end = _json_value_end(text, body)
        found = [] if value_end is None else _calls_in(text[body:value_end])
        if found:
            calls += found
            i = _tagged_call_end(text, value_end, final=True)
            continue
        close = _close_tag(text, body)
        i = close + len(TAG_CLOSE) if close >= 0 else len(text)
        content.append(text[opening:i])  # not a call after all: keep it as text
    content.append(text[i:])
    return _content("".join(content)), calls


def _json_value_end(text: str, start: int) -> int | None:
    """The end of the JSON object or array that begins at the first non-space character from ``start``
    (None if none begins there, or it is not complete)."""
    found = _NOT_SPACE.search(text, start)
    return _value_end(text, found.start()) if found is not None and found.group() in "{[" else None


def _tagged_call_end(text: str, call_end: int, final: bool) -> int:
    """Where a tagged call whose JSON ended at ``call_end`` is over: past its ``</tool_call>``, or at the
    next ``<tool_call>`` when that comes first, or (at the reply's end) where its JSON ended; -1 while
    neither has come. What lies between its JSON and its end is the call's."""
    close = text.find(TAG_CLOSE, call_end)
    opening = text.find(TAG_OPEN, call_end)
    if close >= 0 and (opening < 0 or close < opening):
        return close + len(TAG_CLOSE)
    if opening >= 0:
        return opening
    return call_end if final else -1


def _calls_in(body: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = [_call(item) for item in items]
    return calls if calls and all(c is not None for c in calls) else []


def _call(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return new_call(item["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """Turns streamed text into OpenAI chat deltas: ``{"content": ...}`` or ``{"tool_calls": [...]}``.

    named: the first delta names the function, each later one adds argument text as it arrives.
    required: as named, call after call: a call's id and name go out once its ``"name"`` is complete and
    its ``"parameters"`` value has begun (the grammar writes them in that order), then its arguments
    text as it arrives (the parameters value exactly as written)::

        [{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": ...
        |------- head: id, name -----------||-- arguments ---|
    auto: text is content until a ``<tool_call>`` may begin (a possible tag prefix is held back); a
    tagged call of the form ``{"name": ..., "arguments": {...}}`` streams as a required one does, and
    what follows its object up to ``</tool_call>`` is the call's; any other body (a list of calls,
    arguments written as a string) goes whole once its closing tag arrives. A reply that starts like a
    Llama-3 JSON call streams its calls the same way once a head is complete; JSON that never shows one
    is held to the end and read as ``parse_calls`` reads a whole reply.

    Each character is scanned once (``_ValueScan``), however long the arguments and however small the
    pieces they arrive in.
    """

    def __init__(self, tool_plan: ToolPlan):
        self.plan = tool_plan
        self.buffer = ""
        self.num_calls = 0
        self._sent = 0  # buffer characters already turned into deltas
        self._call: _ValueScan | None = None  # the object of the call being streamed ...
        self._arguments: _ValueScan | None = None  # ... and its arguments, once its head was sent
        self._json_reply = False  # auto: the reply is Llama-3 JSON calls, streaming
        self._rest_is_content = False  # ... and they ended: all that follows is content, tags too
        self._separator = False  # ... and a ";" or the end comes next
        self._body: _ValueScan | None = None  # auto: the JSON body of a tag that goes whole ...
        self._body_from = 0  # ... or where to look on for its start (-1: the body is text)
        self._no_head = -1  # where a call head was looked for in vain for MAX_HEAD_CHARS characters
        self._spaces = ""  # auto: whitespace content held until text follows it ...
        self._text_sent = False  # ... or sent, once content other than whitespace was

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buffer += text
        mode = self.plan.mode
        if mode == "named":
            return self._named(text)
        if mode == "required":
            return self._required()
        if mode == "auto":
            return self._held_back(self._auto(final=False))
        return [{"content": text}] if text else []

    def finish(self) -> list[dict[str, Any]]:
        if self.plan.mode == "required":
            return self._required()
        if self.plan.mode == "auto":
            return self._held_back(self._auto(final=True))
        return []

    def _held_back(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Content that is only whitespace waits until text follows it (and is dropped if none does), as
        ``parse_calls`` gives no content for a reply whose text outside its calls is only whitespace."""
        out = []
        for delta in deltas:
            if "content" not in delta or self._text_sent:
                out.append(delta)
                continue
            self._spaces += delta["content"]
            if self._spaces.strip():
                out.append({"content": self._spaces})
                self._text_sent, self._spaces = True, ""
        return out

    def _named(self, text: str) -> list[dict[str, Any]]:
        deltas = []
        if self.num_calls == 0:
            call = new_call(self.plan.name, "")
            deltas.append({"tool_calls": [{"index": 0, **call}]})
            self.num_calls = 1
        if text:
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        return deltas

    def _emit(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each call as OpenAI streams one: its id and name (empty arguments), then its arguments."""
        deltas = []
        for call in calls:
            function = call["function"]
            head = {**call, "function": {"name": function["name"], "arguments": ""}}
            deltas.append({"tool_calls": [{"index": self.num_calls, **head}]})
            arguments = {"index": self.num_calls, "function": {"arguments": function["arguments"]}}
            deltas.append({"tool_calls": [arguments]})
            self.num_calls += 1
        return deltas

    def _start(self, head: re.Match, call_start: int) -> list[dict[str, Any]]:
        """The head delta of a call whose head matched (``_head``); its arguments stream from the head's
        end."""
        name = json.loads(f'"{head.group(1)}"')
        self._call, self._arguments = _ValueScan(call_start), _ValueScan(head.end())
        self._sent, self._body = head.end(), None
        self.num_calls += 1
        return [{"tool_calls": [{"index": self.num_calls - 1, **new_call(name, "")}]}]

    def _arguments_delta(self) -> list[dict[str, Any]]:
        """The current call's argument text that arrived since the last delta (up to the value's end)."""
        value_end = self._arguments(self.buffer)
        upto = len(self.buffer) if value_end is None else value_end
        if upto <= self._sent:
            return []
        arguments, self._sent = self.buffer[self._sent : upto], upto
        return [{"tool_calls": [{"index": self.num_calls - 1, "function": {"arguments": arguments}}]}]

    def _required(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while True:
            if self._call is None:
                start = self._next_element()
                if start is None:
                    return deltas
                self._call = _ValueScan(start)
            end = self._call(self.buffer)
            if self._arguments is None:
                start = self._call.start
                head = self._head(_REQUIRED_HEAD, start)
                if head is None:
                    if end is None:
                        return deltas  # the head is still being written
                    # a complete element in another form (not what the grammar writes): sent whole
                    whole = _call(_loads(self.buffer[start:end]))
                    deltas += self._emit([whole] if whole is not None else [])
                    self._call, self._sent = None, end
                    continue
                deltas += self._start(head, start)
            deltas += self._arguments_delta()
            if end is None:
                return deltas
            self._call = self._arguments = None
            self._sent = end

    def _next_element(self) -> int | None:
        """Where the next array element begins (its ``{``) once it has, else None."""
        if self._sent == 0:
            opening = self.buffer.find("[")
            if opening < 0:
                return None
            self._sent = opening + 1
        found = _ELEMENT_START.search(self.buffer, self._sent)
        self._sent = len(self.buffer) if found is None else found.start()  # separators are no content
        return self._sent if found is not None and found.group() == "{" else None

    def _json_calls(self, final: bool) -> list[dict[str, Any]]:
        """A Llama-3 reply: calls ``{"name": ..., "parameters": {...}}`` joined by ``;``, each streamed
        once its head is complete; what follows them is content."""
        deltas: list[dict[str, Any]] = []
        while True:
            if self._call is not None:
                deltas += self._arguments_delta()
                end = self._call(self.buffer)
                if end is None:
                    if final:
                        self._call = self._arguments = None
                        self._sent = len(self.buffer)
                    return deltas
                self._call = self._arguments = None
                self._sent, self._separator = end, True
            if self._separator:  # after a call: the end, or ";" and the next one
                after = _NOT_SPACE.search(self.buffer, self._sent)
                if after is None:
                    return deltas
                if after.group() != ";":  # text after the calls: content, as parse_calls reads it
                    return deltas + self._rest_as_content()
                self._sent, self._separator = after.end(), False
            found = _NOT_SPACE.search(self.buffer, self._sent)
            start = len(self.buffer) if found is None else found.start()
            if self.num_calls == 0 and self.buffer.startswith(PYTHON_TAG, start):
                found = _NOT_SPACE.search(self.buffer, start + len(PYTHON_TAG))
                start = len(self.buffer) if found is None else found.start()
            head = self._head(_JSON_HEAD, start)
            if head is not None:
                self._json_reply = True
                deltas += self._start(head, start)
                continue
            if self.num_calls and start < len(self.buffer) and self.buffer[start] != "{":
                return deltas + self._rest_as_content()  # after "<call>;", no call can follow
            if not final:
                return deltas  # the head may still come: held
            if self.num_calls:  # the end after "<call>;": the rest is content
                return deltas + self._rest_as_content()
            # the end, and no call head: read the rest as a whole reply is read
            content, calls = parse_calls(self.buffer[self._sent :])
            self._sent = len(self.buffer)
            return deltas + ([{"content": content}] if content else []) + self._emit(calls)

    def _rest_as_content(self) -> list[dict[str, Any]]:
        """The Llama-3 calls are over: from here on every character is content."""
        self._json_reply, self._rest_is_content = False, True
        text, self._sent = self.buffer[self._sent :], len(self.buffer)
        return [{"content": text}] if text else []

    def _auto(self, final: bool) -> list[dict[str, Any]]:
        if self._rest_is_content:
            return self._rest_as_content()
        deltas: list[dict[str, Any]] = []
        may_be_json = False
        if self._sent == 0 and self.num_calls == 0 and not self._json_reply:
            first = _NOT_SPACE.search(self.buffer)
            may_be_json = first is None or self.buffer[first.start() :].startswith(
                ("{", PYTHON_TAG[: len(self.buffer) - first.start()])
            )
        if self._json_reply or may_be_json:
            return self._json_calls(final)  # a reply that starts like a Llama-3 call
        while True:
            if self._call is not None:  # a tagged call being streamed
                deltas += self._arguments_delta()
                if not self._end_tagged_call(final):
                    return deltas
                continue
            start = self.buffer.find(TAG_OPEN, self._sent)
            if start < 0:
                pending = self.buffer[self._sent :]
                keep = 0 if final else _tag_prefix_len(pending)
                text = pending[: len(pending) - keep]
                if text:
                    deltas.append({"content": text})
                    self._sent += len(text)
                return deltas
            if start > self._sent:
                deltas.append({"content": self.buffer[self._sent : start]})
                self._sent = start
                continue
            head = self._head(_TAGGED_HEAD, self._sent)
            if head is not None:  # <tool_call>{"name": ..., "arguments": {: its arguments stream from here
                deltas += self._start(head, self.buffer.index("{", self._sent, head.end()))
                continue
            used = self._whole_tag_end(final)
            if used < 0:
                return deltas  # perhaps a head still being written, or a body in another form
            calls = [] if self._body is None else _calls_in(self.buffer[self._body.start : self._body.end])
            deltas += self._emit(calls) if calls else [{"content": self.buffer[self._sent : used]}]
            self._sent, self._body, self._body_from = used, None, 0

    def _head(self, pattern: re.Pattern, start: int) -> re.Match | None:
        """``pattern`` matched at ``start`` if it does there and names its function with a JSON string.
        A head is looked for in the first MAX_HEAD_CHARS characters only, so a name that never ends is
        not scanned again with every piece."""
        if len(self.buffer) - start > MAX_HEAD_CHARS and start == self._no_head:
            return None
        head = pattern.match(self.buffer, start, start + MAX_HEAD_CHARS)
        try:
            if head is not None and isinstance(json.loads(f'"{head.group(1)}"'), str):
                return head
        except json.JSONDecodeError:
            pass
        if len(self.buffer) - start > MAX_HEAD_CHARS:
            self._no_head = start
        return None

    def _whole_tag_end(self, final: bool) -> int:
        """Where the tag at ``_sent`` that is not streamed ends (-1: not yet). A JSON body holding calls
        ends as a streamed call does; any other body at its ``</tool_call>`` (one inside a JSON string
        is text), or at the reply's end."""
        tag_end = self._sent + len(TAG_OPEN)
        if self._body is None and self._body_from >= 0:
            found = _NOT_SPACE.search(self.buffer, max(tag_end, self._body_from))
            if found is None:  # only spaces so far: look on from here next time
                self._body_from = len(self.buffer)
                return len(self.buffer) if final else -1
            if found.group() in "{[":
                self._body = _ValueScan(found.start())
            else:
                self._body_from = -1  # a body of text
        if self._body is None:
            close = self.buffer.find(TAG_CLOSE, tag_end)
            return close + len(TAG_CLOSE) if close >= 0 else (len(self.buffer) if final else -1)
        value_end = self._body(self.buffer)
        if value_end is None:
            return len(self.buffer) if final else -1
        if _calls_in(self.buffer[self._body.start : value_end]):
            return _tagged_call_end(self.buffer, value_end, final)
        close = self.buffer.find(TAG_CLOSE, value_end)
        return close + len(TAG_CLOSE) if close >= 0 else (len(self.buffer) if final else -1)

    def _end_tagged_call(self, final: bool) -> bool:
        """Whether the tagged call being streamed is over (``_sent`` then points past it): its object
        closed and then its ``</tool_call>`` came (what lies between is the call's), or another
        ``<tool_call>`` began, or the reply ended."""
        end = self._call(self.buffer)
        if end is None:  # its object is still open
            if not final:
                return False
            # it never closed: up to a closing tag after its arguments is the call's, the rest content
            after = self._arguments.end if self._arguments.end is not None else len(self.buffer)
            close = self.buffer.find(TAG_CLOSE, after)
            self._sent = len(self.buffer) if close < 0 else close + len(TAG_CLOSE)
        else:
            over = _tagged_call_end(self.buffer, end, final)
            if over < 0:
                return False
            self._sent = over
        self._call = self._arguments = None
        return True


_CALL_NAME = r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*'  # {"name": "<name>",
# a required call's head as the grammar writes it, up to the first character of its parameters value
_REQUIRED_HEAD = re.compile(_CALL_NAME + r'"parameters"\s*:\s*(?=\S)')
# a Llama-3 call's head up to its parameters object
_JSON_HEAD = re.compile(_CALL_NAME + r'"(?:parameters|arguments)"\s*:\s*(?=\{)')
# a tagged (Hermes) call's head up to its arguments object (arguments written as a string go whole)
_TAGGED_HEAD = re.compile(
    re.escape(TAG_OPEN) + r"\s*" + _CALL_NAME + r'"(?:arguments|parameters)"\s*:\s*(?=\{)'
)
_JSON_SPECIAL = re.compile(r'[\\"{}\[\]]')
_NOT_SPACE = re.compile(r"\S")
_ELEMENT_START = re.compile(r"[^\s,]")
_SCALAR_END = re.compile(r"[,}\]\s]")


class _ValueScan:
    """Where the JSON value that begins at ``start`` ends (an object, array, string or scalar), found by
    scanning each character once however the text arrives: call it with the text so far, it returns the
    end offset or None while the value is still being written. Strings (and escapes in them) are
    respected; a ``}`` or ``]`` too many ends the value."""

    def __init__(self, start: int):
        self.start = self.pos = start
        self.end: int | None = None
        self._depth, self._in_string, self._escape, self._scalar = 0, False, False, None

    def __call__(self, text: str) -> int | None:
        if self.end is not None or self.pos >= len(text):
            return self.end
        if self._scalar is None:
            self._scalar = text[self.pos] not in '{["'
        if self._scalar:
            found = _SCALAR_END.search(text, self.pos)
            self.pos = len(text) if found is None else found.start()
            self.end = None if found is None else found.start()
            return self.end
        i = self.pos
        if self._escape:  # the character after a backslash that ended the last piece
            i, self._escape = i + 1, False
        while True:
            found = _JSON_SPECIAL.search(text, i)
            if found is None:
                self.pos = len(text)
                return None
            ch, i = found.group(), found.end()
            if self._in_string:
                if ch == "\\":
                    if i >= len(text):
                        self.pos, self._escape = i, True
                        return None
                    i += 1
                elif ch == '"':
                    self._in_string = False
                    if self._depth == 0:
                        self.end = i
                        return i
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self.end = i
                    return i


def _close_tag(text: str, start: int) -> int:
    """Where the ``</tool_call>`` that closes a tag body beginning at ``start`` is (-1: not yet): after
    the JSON value the body holds, so that one inside a string does not count."""
    body = len(text) - len(text[start:].lstrip())
    if text[body : body + 1] not in ("{", "["):
        return text.find(TAG_CLOSE, start)
    value_end = _value_end(text, body)
    return -1 if value_end is None else text.find(TAG_CLOSE, value_end)


def _value_end(text: str, start: int) -> int | None:
    """The end offset of the JSON value that begins at ``text[start]``, or None while it is being written."""
    return _ValueScan(start)(text)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _tag_prefix_len(text: str) -> int:
    """Length of the longest suffix of ``text`` that begins ``<tool_call>`` (held back while streaming)."""
    for n in range(min(len(TAG_OPEN) - 1, len(text)), 0, -1):
        if TAG_OPEN.startswith(text[-n:]):
            return n
    return 0
