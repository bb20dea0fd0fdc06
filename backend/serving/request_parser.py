"""Turns the tensors (and HTTP parameters) of one Triton request into a validated generation request.

Independent of Triton's Python API so it can be tested directly: inputs arrive as a dict of numpy arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pagetron.backend.core.chat_messages import validate_messages, validate_tools
from pagetron.backend.core.errors import InvalidRequestError
from pagetron.backend.core.sampling_params import SamplingParams, SamplingParamsError
from pagetron.backend.serving.schema import BOOL_INPUT_NAMES, PROMPT_INPUT_NAMES

# HTTP generate turns every JSON key that is not an input into a parameter; these are not sampling keys
_NON_SAMPLING_PARAMETERS = {"triton_enable_empty_final_response", "sequence_id", "priority", "timeout"}


@dataclass
class ParsedRequest:
    prompt: str | list[int] | dict  # dict: {"messages": [...]}, rendered with the chat template
    params: SamplingParams
    stream: bool = False
    # as Triton's vLLM backend: when not given, the prompt is prepended unless streaming
    exclude_input_in_output: bool = True
    return_finish_reason: bool = False
    return_cumulative_logprob: bool = False
    return_logprobs: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False


def parse_request(inputs: dict[str, np.ndarray], parameters: str | dict | None = None) -> ParsedRequest:
    """Raises InvalidRequestError / SamplingParamsError naming the offending input or key."""
    prompt = _prompt(inputs)
    flags = {name: _bool(inputs, name) for name in BOOL_INPUT_NAMES if name in inputs}
    stream = flags.get("stream", False)
    if "exclude_input_in_output" not in flags:
        flags["exclude_input_in_output"] = stream
    elif stream and not flags["exclude_input_in_output"]:
        raise InvalidRequestError(
            "exclude_input_in_output", "When streaming, `exclude_input_in_output` = False is not allowed."
        )
    params = _sampling_params(inputs, parameters)
    return ParsedRequest(prompt=prompt, params=params, **flags)


def _prompt(inputs: dict[str, np.ndarray]) -> str | list[int] | dict:
    given = [name for name in PROMPT_INPUT_NAMES if name in inputs]
    if len(given) != 1:
        raise InvalidRequestError(
            given[1] if given else "text_input",
            "give exactly one of text_input, input_ids or messages",
        )
    if "input_ids" in inputs:
        ids = np.asarray(inputs["input_ids"]).reshape(-1)
        if ids.size == 0:
            raise InvalidRequestError("input_ids", "the prompt is empty")
        return [int(t) for t in ids]
    if "messages" in inputs:
        try:
            messages = json.loads(_one_string(inputs, "messages"))
        except (json.JSONDecodeError, RecursionError) as e:
            raise InvalidRequestError("messages", f"is not valid JSON: {e}") from None
        chat: dict[str, Any] = {"messages": validate_messages(messages)}
        if "tools" in inputs:
            try:
                chat["tools"] = validate_tools(json.loads(_one_string(inputs, "tools")))
            except (json.JSONDecodeError, RecursionError) as e:
                raise InvalidRequestError("tools", f"is not valid JSON: {e}") from None
        return chat
    if "tools" in inputs:
        raise InvalidRequestError("tools", "tools go with a chat (the messages input)")
    raw = _one_string(inputs, "text_input")
    if not raw:
        raise InvalidRequestError("text_input", "the prompt is empty")
    return raw


def _one_string(inputs: dict[str, np.ndarray], name: str) -> str:
    """The single UTF-8 string element of a BYTES input."""
    values = np.asarray(inputs[name], dtype=object).reshape(-1)
    if values.size != 1:
        raise InvalidRequestError(name, f"expected exactly one element, got {values.size}")
    raw = values[0]
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequestError(name, f"is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(raw, str):
        raise InvalidRequestError(name, f"expected a string, got {type(raw).__name__}")
    return raw


def _bool(inputs: dict[str, np.ndarray], name: str) -> bool:
    values = np.asarray(inputs[name]).reshape(-1)
    if values.size != 1 or values.dtype != np.bool_:
        raise InvalidRequestError(name, f"expected one BOOL, got {values.size} of {values.dtype}")
    return bool(values[0])


def _sampling_params(inputs: dict[str, np.ndarray], parameters: str | dict | None) -> SamplingParams:
    merged: dict[str, Any] = {}
    if parameters:
        try:
            http = json.loads(parameters) if isinstance(parameters, str) else dict(parameters)
        except (json.JSONDecodeError, RecursionError) as e:
            raise SamplingParamsError("parameters", f"are not valid JSON: {e}") from None
        merged.update({k: v for k, v in http.items() if k not in _NON_SAMPLING_PARAMETERS})
    if "sampling_parameters" in inputs:
        values = np.asarray(inputs["sampling_parameters"], dtype=object).reshape(-1)
        if values.size != 1:
            raise SamplingParamsError("sampling_parameters", f"expected one JSON string, got {values.size}")
        raw = values[0]
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            tensor_params = json.loads(text) if text else {}
        except (json.JSONDecodeError, RecursionError, UnicodeDecodeError, TypeError) as e:
            raise SamplingParamsError("sampling_parameters", f"is not valid JSON: {e}") from None
        if not isinstance(tensor_params, dict):
            raise SamplingParamsError("sampling_parameters", "must be a JSON object")
        merged.update(tensor_params)
    return SamplingParams.from_dict(merged)
