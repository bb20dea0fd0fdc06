"""Errors in OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``, with its statuses."""

from __future__ import annotations

import re
from typing import Any

from pagetron.backend.core.errors import AT_CAPACITY
from pagetron.client.errors import TritonRequestError

# Triton error code -> HTTP status. UNAVAILABLE splits: backpressure is 429 (retry later), the rest 503.
_STATUS_OF_CODE = {
    "INVALID_ARG": 400,
    "NOT_FOUND": 404,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499,
}
_CODE_OF_STATUS = {429: "server_at_capacity", 503: "service_unavailable", 504: "timeout"}
# "invalid sampling parameter 'top_p': ..." (SamplingParamsError) or "prompt: ..." (InvalidRequestError)
_SAMPLING_FIELD = re.compile(r"^invalid sampling parameter '([A-Za-z_]+)'")
_REQUEST_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": error_type(self.status),
                "param": self.param,
                "code": self.code,
            }
        }


def error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param)


def unknown_model(model: str, served: list[str]) -> OpenAIError:
    listing = ", ".join(repr(m) for m in served) or "none"
    return OpenAIError(
        404, f"The model {model!r} does not exist; served models: {listing}", "model", "model_not_found"
    )


def from_triton(error: TritonRequestError, rename: dict[str, str] | None = None) -> OpenAIError:
    """A failed Triton request as the API error a client should see; ``rename`` maps the engine's names
    for fields (sampling keys) to the request's (max_tokens -> max_completion_tokens, ...)."""
    status = _STATUS_OF_CODE.get(error.code, 500)
    if error.code == "UNAVAILABLE" and AT_CAPACITY in error.message:
        status = 429
    if error.code == "UNAVAILABLE" and "failed to connect" in error.message.lower():
        return OpenAIError(
            503, f"the Triton server is unreachable: {error.message}", code="triton_unavailable"
        )
    param = None
    if status == 400:
        match = _SAMPLING_FIELD.match(error.message) or _REQUEST_FIELD.match(error.message)
        if match:
            param = (rename or {}).get(match.group(1), match.group(1))
    return OpenAIError(status, error.message, param=param, code=_CODE_OF_STATUS.get(status))


def validation_error(errors: list[dict[str, Any]]) -> OpenAIError:
    """A pydantic / FastAPI RequestValidationError's first problem, naming the field by its JSON path."""
    # a union field reports one error per member ("prompt.str", "prompt.list[int].0"): the deepest one is
    # the member the value was meant for
    field = errors[0].get("loc", ())[:2]
    first = max(
        (e for e in errors if e.get("loc", ())[:2] == field),
        key=lambda e: (len(e.get("loc", ())), not e.get("type", "").endswith("_type")),  # range over type
    )
    location = [p for p in first.get("loc", ()) if p != "body"]
    # unions report the member that failed ("prompt.str", "prompt.list[int].0"): keep the request's path
    param = ""
    for part in location:
        if isinstance(part, int):
            param += f"[{part}]"  # messages[2].role, as the chat template checks name it
        elif not re.match(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*)$", str(part)):
            param += f".{part}" if param else str(part)
    param = param or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return OpenAIError(
            400, "the request body must be a JSON object (send Content-Type: application/json)"
        )
    if first.get("type") == "extra_forbidden":
        message = "is not a supported field"
    elif first.get("type") == "json_invalid":
        return OpenAIError(
            400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
        )
    return OpenAIError(400, f"{param}: {message}" if param else message, param=param)
