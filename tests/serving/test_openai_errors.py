"""Every error the OpenAI frontend returns has OpenAI's shape and status: 400 naming the field, 401 for a
bad key, 404 for an unknown model, 503 with Triton down; a client that disconnects cancels its Triton
request (the engine frees its KV blocks at once)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest

from grpc_helpers import engine_idle, scrape_metrics, wait_until
from openai_frontend import start_frontend
from pagetron.backend.serving.launcher import free_port

CHAT = [{"role": "user", "content": "Tell me a long story about a dragon."}]


def post(frontend, path: str, body: dict | str, key: str | None = "default", **kwargs) -> httpx.Response:
    key = frontend.api_key if key == "default" else key
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, str):
        headers["content-type"] = "application/json"
        return httpx.post(f"{frontend.base_url}{path}", content=body, headers=headers, timeout=60, **kwargs)
    return httpx.post(f"{frontend.base_url}{path}", json=body, headers=headers, timeout=60, **kwargs)


def assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/completions", {"model": "llm", "prompt": "x", "max_tokenz": 3}, "max_tokenz", ["not a supported"]),
        ("/completions", {"model": "llm", "prompt": "x", "temperature": "hot"}, "temperature", ["number"]),
        ("/completions", {"model": "llm", "prompt": "x", "top_p": 7}, "top_p", ["(0, 1]"]),
        ("/completions", {"model": "llm", "prompt": "x", "n": 0}, "n", ["greater than or equal to 1"]),
        (
            "/completions",
            {"model": "llm", "prompt": "x", "max_tokens": 5000},
            "max_tokens",
            ["max_model_len"],
        ),
        ("/completions", {"model": "llm", "prompt": "hi " * 3000}, "prompt", ["max_model_len"]),
        ("/completions", {"model": "llm", "prompt": ""}, "prompt", ["empty"]),
        ("/completions", {"model": "llm", "prompt": []}, "prompt", ["empty"]),
        ("/completions", {"model": "llm", "prompt": [10**9]}, "prompt", ["token id"]),
        ("/completions", {"model": "llm", "prompt": "x", "echo": True, "logprobs": 1}, "echo", []),
        ("/completions", {"model": "llm", "prompt": "x", "logit_bias": {"5": 1}}, "logit_bias", []),
        ("/completions", {"prompt": "x"}, "model", ["required"]),
        ("/chat/completions", {"model": "llm", "messages": []}, "messages", []),
        (
            "/chat/completions",
            {"model": "llm", "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
            ["wizard"],
        ),
        (
            "/chat/completions",
            {"model": "llm", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
            ["text"],
        ),
        (
            "/chat/completions",
            {"model": "llm", "messages": CHAT, "max_completion_tokens": 0},
            "max_completion_tokens",
            [">= 1"],
        ),
        (
            "/chat/completions",
            {"model": "llm", "messages": CHAT, "logprobs": True, "top_logprobs": 50},
            "top_logprobs",
            ["[0, 20]"],
        ),
        (
            "/chat/completions",
            {"model": "llm", "messages": CHAT, "top_logprobs": 2},
            "top_logprobs",
            ["logprobs"],
        ),
        (
            "/chat/completions",
            {"model": "llm", "messages": CHAT, "tools": [{"type": "function"}]},
            "tools[0].function",
            ["a name"],
        ),
        (
            "/chat/completions",
            {"model": "llm", "messages": CHAT, "stream": True, "seed": 2**64},
            "seed",
            ["less than or equal"],
        ),
        ("/completions", {"model": "llm", "prompt": "a \udfff b"}, "prompt", ["not valid Unicode"]),
        ("/completions", {"model": "llm", "prompt": [4294967301, 6]}, "prompt[0]", ["less than 2147483648"]),
        ("/completions", {"model": "llm", "prompt": "x", "n": 10**12}, "n", ["less than or equal to 64"]),
        ("/completions", {"model": "llm", "prompt": "x", "store": True}, "store", []),
        (
            "/completions",
            {"model": "llm", "prompt": "x", "stream_options": {"include_usage": True}},
            "stream_options",
            [],
        ),
        (
            "/chat/completions",
            {"model": "llm", "messages": [{"role": "user", "content": "hi \udfff"}]},
            "messages[0].content",
            ["not valid Unicode"],
        ),
        ("/chat/completions", {"model": "llm", "messages": CHAT, "modalities": ["audio"]}, "modalities", []),
        ("/embeddings", {"model": "embed", "input": ["ok", "bad \udfff"]}, "input", ["not valid Unicode"]),
        (
            "/chat/completions",
            {
                "model": "llm",
                "messages": CHAT,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "tags",
                        "schema": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                    },
                },
            },
            "response_format.json_schema.schema",
            ["not supported at /: uniqueItems"],
        ),  # fmt: skip
        (
            "/completions",
            {
                "model": "llm",
                "prompt": "x",
                "guided_json": {"type": "object", "properties": {"n": {"not": {}}}},
            },
            "guided_json",
            ["not supported at /properties/n: not"],
        ),
        (
            "/chat/completions",
            {
                "model": "llm",
                "messages": CHAT,
                "tool_choice": "required",
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "if": {}}},
                    }
                ],
            },
            "tools[0].function.parameters",
            ["if/then/else"],
        ),  # fmt: skip
    ],
)
def test_bad_requests_are_400_naming_the_field(openai_stack, path, body, param, words):
    raw = json.dumps(
        body
    )  # ensure_ascii: a lone surrogate travels as the escape "\\udfff", as clients send it
    assert_error(post(openai_stack.frontend, path, raw), 400, param, *words)


def test_json_nested_past_the_parsers_limit_is_a_400(openai_stack):
    for deep in ("[" * 100_000, '{"model": "llm", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"):
        response = post(openai_stack.frontend, "/completions", deep)
        assert response.status_code == 400, response.text[:300]
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert post(
        openai_stack.frontend, "/completions", {"model": "llm", "prompt": "x", "max_tokens": 1}
    ).is_success


def test_a_lone_surrogate_in_a_chat_leaves_the_engine_serving(openai_stack):
    bad = {"model": "llm", "messages": [{"role": "user", "content": "hi \udfff there"}], "max_tokens": 2}
    assert post(openai_stack.frontend, "/chat/completions", json.dumps(bad)).status_code == 400
    good = {"model": "llm", "messages": CHAT, "max_tokens": 2}
    assert post(openai_stack.frontend, "/chat/completions", good).status_code == 200


def test_nulls_mean_defaults_and_neutral_fields_are_accepted(openai_stack):
    body = {
        "model": "llm",
        "messages": CHAT,
        "max_tokens": 3,
        "n": None,
        "stream": None,
        "logprobs": None,
        "temperature": None,
        "store": False,
        "metadata": {"team": "a"},
        "service_tier": "auto",
        "modalities": ["text"],
        "tool_choice": "none",
        "user": "u1",
        "seed": -5,
    }
    response = post(openai_stack.frontend, "/chat/completions", body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1
    stream = {**body, "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}
    assert post(openai_stack.frontend, "/chat/completions", stream).status_code == 200


def test_non_ascii_bearer_token_is_401_not_500(openai_stack):
    frontend = openai_stack.frontend
    headers = {"authorization": "Bearer s\xe9cret".encode("latin-1")}
    r = httpx.post(f"{frontend.base_url}/completions", json={"model": "llm", "prompt": "x"}, headers=headers)
    assert r.status_code == 401


def test_a_body_that_is_not_json(openai_stack):
    error = assert_error(post(openai_stack.frontend, "/completions", "{nope"), 400, None, "not valid JSON")
    assert error["type"] == "invalid_request_error"


def test_a_stream_refused_up_front_gets_its_status_not_an_event_stream(openai_stack):
    body = {"model": "llm", "prompt": "x", "stream": True, "top_p": 3}
    assert_error(post(openai_stack.frontend, "/completions", body), 400, "top_p")


def test_api_key_is_required_on_v1_only(openai_stack):
    frontend = openai_stack.frontend
    body = {"model": "llm", "prompt": "x", "max_tokens": 1}
    for key in (None, "wrong-key"):
        error = assert_error(post(frontend, "/completions", body, key=key), 401, None, "API key")
        assert error["code"] == "invalid_api_key"
    # refused before the body is read: without the key, a body that is not JSON is a 401, not a 400
    assert_error(post(frontend, "/completions", "{nope", key=None), 401, None, "API key")
    assert httpx.get(f"{frontend.base_url}/models").status_code == 401
    assert httpx.get(f"{frontend.root_url}/health", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=frontend.base_url, api_key="wrong", max_retries=0).models.list()


def test_unknown_model_is_404(openai_stack):
    error = assert_error(
        post(openai_stack.frontend, "/completions", {"model": "gpt-9", "prompt": "x"}), 404, "model", "gpt-9"
    )
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        openai_stack.frontend.client().chat.completions.create(model="gpt-9", messages=CHAT)


def test_triton_down_is_503(tmp_path):
    frontend = start_frontend(f"127.0.0.1:{free_port()}", tmp_path / "frontend.log")
    try:
        body = {"model": "llm", "messages": CHAT, "max_tokens": 2}
        error = assert_error(post(frontend, "/chat/completions", body), 503, None, "unreachable")
        assert error["type"] == "server_error"
        assert httpx.get(f"{frontend.root_url}/health", timeout=30).status_code == 503
        with pytest.raises(openai.InternalServerError) as raised:
            frontend.client().completions.create(model="llm", prompt="x")
        assert raised.value.status_code == 503
    finally:
        frontend.stop()


def wait_idle(metrics_url: str, timeout: float) -> float:
    """Seconds until no request runs or waits and no KV block is used; fails after ``timeout``."""
    start = time.monotonic()
    if wait_until(lambda: engine_idle(scrape_metrics(metrics_url)), timeout, interval_s=0.1):
        return time.monotonic() - start
    m = scrape_metrics(metrics_url)
    raise AssertionError(f"the engine still had work {timeout} s after the client left: {m}")


def wait_running(metrics_url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while scrape_metrics(metrics_url)["vllm:num_requests_running"] < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)


def test_disconnect_mid_stream_cancels_the_triton_request(openai_stack):
    frontend, metrics = openai_stack.frontend, openai_stack.server.metrics_url
    body = {"model": "llm", "messages": CHAT, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    headers = {"authorization": f"Bearer {frontend.api_key}"}
    with httpx.stream("POST", f"{frontend.base_url}/chat/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(4)]  # a few tokens arrived; then the client leaves
    before = scrape_metrics(metrics)["vllm:generation_tokens_total"]
    assert wait_idle(metrics, 10) < 5
    generated = scrape_metrics(metrics)["vllm:generation_tokens_total"] - before
    assert generated < 200  # stopped long before max_tokens


def test_disconnect_while_waiting_for_a_whole_completion_cancels_it(openai_stack):
    frontend, metrics = openai_stack.frontend, openai_stack.server.metrics_url
    body = json.dumps({"model": "llm", "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True})
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {frontend.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    )
    with socket.create_connection(("127.0.0.1", frontend.port)) as connection:
        connection.sendall(request.encode())
        wait_running(metrics)
    assert wait_idle(metrics, 10) < 5
