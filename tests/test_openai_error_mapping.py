"""Triton failures and body validation problems -> OpenAI errors: status, type, param and code."""

from pagetron.backend.openai_api.errors import from_triton, validation_error
from pagetron.client.errors import TritonRequestError


def mapped(message: str, code: str, rename=None) -> tuple:
    e = from_triton(TritonRequestError(message, code), rename)
    body = e.body()["error"]
    return e.status, body["type"], body["param"], body["code"]


def test_triton_codes_become_statuses_naming_the_field():
    assert mapped("invalid sampling parameter 'top_p': must be in (0, 1]", "INVALID_ARG") == (
        400,
        "invalid_request_error",
        "top_p",
        None,
    )
    rename = {"max_tokens": "max_completion_tokens"}
    assert mapped("max_tokens: the prompt has 9 tokens", "INVALID_ARG", rename)[2] == "max_completion_tokens"
    assert mapped("messages[1].role: must be one of", "INVALID_ARG")[2] == "messages[1].role"
    assert mapped("the server is at capacity: 3 requests in flight", "UNAVAILABLE") == (
        429,
        "rate_limit_error",
        None,
        "server_at_capacity",
    )
    assert mapped("the server is shutting down", "UNAVAILABLE")[:1] == (503,)
    assert mapped("failed to connect to all addresses", "UNAVAILABLE")[3] == "triton_unavailable"
    assert mapped("engine step failed", "INTERNAL")[:2] == (500, "server_error")


def test_validation_errors_name_the_json_path():
    e = validation_error(
        [{"loc": ("body", "messages", 2, "role"), "msg": "Field required", "type": "missing"}]
    )
    assert (e.status, e.param, e.message) == (400, "messages[2].role", "messages[2].role: Field required")
    e = validation_error([{"loc": ("body", "prompt", "list[int]", 0), "msg": "bad", "type": "int_type"}])
    assert e.param == "prompt[0]"
    e = validation_error([{"loc": ("body", "max_tokenz"), "msg": "x", "type": "extra_forbidden"}])
    assert e.message == "max_tokenz: is not a supported field"
    e = validation_error([{"loc": ("body",), "msg": "x", "type": "model_attributes_type"}])
    assert e.param is None and "Content-Type: application/json" in e.message
