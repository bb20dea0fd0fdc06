"""Request body limits of `pagetron openai` (one request must never take the service down): a body over the
limit gets OpenAI's 413 on every POST route before it is read (from its Content-Length, or counted as a
chunked body streams in), a body of exactly the limit is answered, and a flood of large bodies leaves
the requests in flight exact, the process up and its memory bounded.

The tests run a frontend of their own (default limit, API key) in front of the session's tritonserver,
so its pid and memory tell only this module's story.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from openai_frontend import API_KEY, Frontend
from pagetron.backend import SamplingParams
from pagetron.backend.cli.openai import DEFAULT_MAX_MODEL_LEN
from pagetron.backend.openai_api.app import IN_FLIGHT_BODIES
from pagetron.backend.serving.constants import OPENAI_API_KEY_ENV
from pagetron.backend.serving.launcher import free_port
from pagetron.backend.serving.limits import request_body_limit
from pagetron.backend.serving.supervisor import frontend_command, wait_listening

LIMIT = request_body_limit(DEFAULT_MAX_MODEL_LEN)  # the frontend's default: 2 MiB
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
AUTH = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"
EMBED_TEXT = "a sentence to embed"


@pytest.fixture(scope="module")
def frontend(openai_stack, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("openai-limits") / "frontend.log"
    env = {**os.environ, OPENAI_API_KEY_ENV: API_KEY}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            frontend_command(openai_stack.server.grpc_url, port),  # the default limit
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    started = Frontend(process, port, API_KEY, log_path)
    if not wait_listening(process, started.root_url):
        started.stop()
        raise RuntimeError(f"pagetron openai did not start listening: {log_path.read_text()[-3000:]}")
    yield started
    started.stop()


def request_body(route: str, size: int | None = None, max_tokens: int = 4) -> bytes:
    """A valid request for ``route``, padded to exactly ``size`` bytes through `user` (accepted and
    ignored, so Triton's work does not depend on the size)."""
    if route == "/v1/embeddings":
        fields: dict = {"model": "embed", "input": EMBED_TEXT}
    elif route == "/v1/completions":
        fields = {"model": "llm", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    else:
        fields = {"model": "llm", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    body = json.dumps({**fields, "user": ""}).encode()
    if size is None:
        return body
    assert size >= len(body)
    return json.dumps({**fields, "user": "u" * (size - len(body))}).encode()


def request_head(route: str, declared: int | None) -> bytes:
    framing = f"content-length: {declared}" if declared is not None else "transfer-encoding: chunked"
    head = "".join(f"{k}: {v}\r\n" for k, v in AUTH.items())
    return f"POST {route} HTTP/1.1\r\nhost: test\r\n{head}{framing}\r\n\r\n".encode()


def raw_post(port: int, route: str, declared: int | None, body: bytes) -> tuple[int, dict, bytes, float]:
    """POSTs over a plain socket: with Content-Length ``declared`` (sending only ``body``, maybe less), or
    chunked (``declared`` None) without the final chunk; (status, headers, body, seconds from the last
    byte sent to the whole response, read until the server closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_head(route, declared))
        for start in range(0, len(body), 1 << 16):
            part = body[start : start + (1 << 16)]
            sock.sendall(part if declared is not None else b"%x\r\n%s\r\n" % (len(part), part))
        sent = time.monotonic()
        response = b""
        while chunk := sock.recv(1 << 16):
            response += chunk
        took = time.monotonic() - sent
    head_text, _, payload = response.partition(b"\r\n\r\n")
    status_line, *lines = head_text.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, payload, took


def assert_too_large(status: int, body: bytes) -> None:
    assert status == 413
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "request_too_large" and error["param"] is None
    assert f"limit of {LIMIT} bytes" in error["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_a_declared_oversize_body_is_refused_from_its_headers(frontend, route):
    # only the headers are sent: the 413 cannot have waited for the body
    status, headers, body, took = raw_post(frontend.port, route, 200_000_000, b"")
    assert_too_large(status, body)
    assert headers["connection"] == "close" and took < 2.0


@pytest.mark.parametrize("route", ROUTES)
def test_a_chunked_body_is_refused_once_it_passes_the_limit(frontend, route):
    # one byte over the limit and no final chunk: refused while the body is still "streaming"
    status, headers, body, took = raw_post(frontend.port, route, None, b"x" * (LIMIT + 1))
    assert_too_large(status, body)
    assert headers["connection"] == "close" and took < 2.0


def test_the_session_frontend_has_the_default_limit(openai_stack):
    status, _, body, _ = raw_post(openai_stack.frontend.port, "/v1/chat/completions", LIMIT + 1, b"")
    assert_too_large(status, body)


def expected_text(offline, route: str, max_tokens: int = 4) -> str:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if route == "/v1/completions":
        return offline.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text
    return offline.chat(MESSAGES, params, use_tqdm=False)[0].outputs[0].text


def answer_of(route: str, response: httpx.Response) -> str | list[float]:
    assert response.status_code == 200, response.text
    data = response.json()
    if route == "/v1/embeddings":
        return data["data"][0]["embedding"]
    choice = data["choices"][0]
    return choice["text"] if route == "/v1/completions" else choice["message"]["content"]


@pytest.fixture(scope="module")
def expected(tiny_llm, frontend):
    with httpx.Client(headers=AUTH, timeout=60) as http:
        vector = http.post(frontend.root_url + ROUTES[2], content=request_body(ROUTES[2]))
    return {
        ROUTES[0]: expected_text(tiny_llm, ROUTES[0]),
        ROUTES[1]: expected_text(tiny_llm, ROUTES[1]),
        ROUTES[2]: answer_of(ROUTES[2], vector),
    }


def same_answer(route: str, got, want) -> bool:
    return np.allclose(got, want, atol=1e-5) if route == "/v1/embeddings" else got == want


@pytest.mark.parametrize("route", ROUTES)
def test_a_body_of_exactly_the_limit_is_answered_and_one_more_byte_is_not(frontend, expected, route):
    with httpx.Client(headers=AUTH, timeout=60) as http:
        url = frontend.root_url + route
        body = request_body(route, LIMIT)
        assert len(body) == LIMIT
        assert same_answer(route, answer_of(route, http.post(url, content=body)), expected[route])
        chunked = http.post(url, content=iter([body[: LIMIT // 2], body[LIMIT // 2 :]]))  # no length
        assert same_answer(route, answer_of(route, chunked), expected[route])
        over = http.post(url, content=request_body(route, LIMIT + 1))  # a real client, whole body sent
        assert_too_large(over.status_code, over.content)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class PeakRss:
    """The highest VmRSS (KiB) of ``pid`` while the block runs, sampled every 2 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._done = pid, rss_kib(pid), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, rss_kib(self.pid))


def hold_chunked_body(port: int, size: int) -> socket.socket:
    """A connection that has sent ``size`` bytes of a chunked body and waits (no final chunk)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request_head("/v1/embeddings", None))
    for start in range(0, size, 1 << 16):
        part = b"x" * min(1 << 16, size - start)
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    return sock


def poll(check, timeout_s: float = 10.0):
    """``check()`` until it returns something true; that."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return result


def was_answered(sock: socket.socket) -> bool:
    """The server has answered this held body (so no longer counts it)."""
    return bool(select.select([sock], [], [], 0)[0])


def test_bodies_in_flight_past_the_budget_get_429_until_they_end(frontend, expected):
    small = request_body(ROUTES[2])
    url = frontend.root_url + ROUTES[2]
    holders = [hold_chunked_body(frontend.port, LIMIT) for _ in range(IN_FLIGHT_BODIES)]  # the budget

    def probe(http: httpx.Client) -> httpx.Response | bool:
        # A probe the server is still handling when the last held chunk arrives takes budget that chunk
        # needed: that body is refused instead, and the budget never fills. Hold a fresh set then.
        if any(was_answered(sock) for sock in holders):
            for sock in holders:
                sock.close()
            holders[:] = [hold_chunked_body(frontend.port, LIMIT) for _ in range(IN_FLIGHT_BODIES)]
            return False
        response = http.post(url, content=small)
        return response.status_code == 429 and response

    try:
        with httpx.Client(headers=AUTH, timeout=30) as http:
            refused = poll(lambda: probe(http), timeout_s=30)
            error = refused.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "rate_limit_error" and error["code"] == "server_at_capacity"
            assert f"pass {IN_FLIGHT_BODIES * LIMIT} bytes" in error["message"]
            assert refused.headers["connection"] == "close"
            assert http.get(frontend.base_url + "/models").status_code == 200  # no body: never refused
    finally:
        for sock in holders:
            sock.close()
    with httpx.Client(headers=AUTH, timeout=30) as http:  # their bodies are released with them
        answered = poll(lambda: (r := http.post(url, content=small)).status_code == 200 and r)
    assert same_answer(ROUTES[2], answer_of(ROUTES[2], answered), expected[ROUTES[2]])


FLOOD = 50  # bodies just under the limit and as many over it, all at once
STREAMS = 4  # normal streamed chats in flight through the flood
STREAM_TOKENS = 160
# The bound on the frontend's RSS growth through the flood: at most IN_FLIGHT_BODIES bodies are handled
# at once, each costing a few times its size (the bytes read, their join, the parsed string, the
# validated model; measured +38 MB for the whole flood on the 2-core dev VM), plus uvicorn's reads of
# the connections still waiting (at most ~256 KiB each). A generous margin over the ~40 MB measured.
RSS_BOUND_KIB = (4 * IN_FLIGHT_BODIES * LIMIT + 2 * FLOOD * (256 << 10) + (32 << 20)) >> 10


def test_a_flood_of_large_bodies_spares_the_streams_in_flight_and_bounds_memory(frontend, expected, tiny_llm):
    pid, url = frontend.process.pid, frontend.root_url
    messages = [[{"role": "user", "content": f"Tell me a story about {i}."}] for i in range(STREAMS)]
    params = SamplingParams(temperature=0.0, max_tokens=STREAM_TOKENS, ignore_eos=True)
    want_streams = [o.outputs[0].text for o in tiny_llm.chat(messages, params, use_tqdm=False)]
    # (route, body, sent chunked): sizes from the limit down, and from one byte over it up
    under = [(ROUTES[i % 3], request_body(ROUTES[i % 3], LIMIT - 999 * i), i % 2 == 0) for i in range(FLOOD)]
    over = [(r, request_body(r, LIMIT + 1 + 999 * i), chunked) for i, (r, _, chunked) in enumerate(under)]
    started = [threading.Event() for _ in range(STREAMS)]
    finished_early = []

    def stream(i: int) -> str:
        client = frontend.client(timeout=120)
        chunks = client.chat.completions.create(
            model="llm", messages=messages[i], max_tokens=STREAM_TOKENS, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        text = ""
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                started[i].set()
        finished_early.append(not flood_began.is_set())
        return text

    def post(route: str, body: bytes, chunked: bool) -> httpx.Response:
        return http.post(url + route, content=iter([body]) if chunked else body)

    flood_began = threading.Event()
    http = httpx.Client(headers=AUTH, timeout=120, limits=httpx.Limits(max_connections=2 * FLOOD))
    before = rss_kib(pid)
    with http, ThreadPoolExecutor(STREAMS + 2 * FLOOD) as pool, PeakRss(pid) as rss:
        streams = [pool.submit(stream, i) for i in range(STREAMS)]
        assert all(event.wait(30) for event in started)
        flood_began.set()
        t0 = time.monotonic()
        flood = [pool.submit(post, *job) for job in under + over]
        responses = [f.result() for f in flood]
        took = time.monotonic() - t0
        got_streams = [f.result() for f in streams]
    after = rss_kib(pid)
    answered = sum(r.status_code == 200 for r in responses[:FLOOD])
    print(
        f"\nflood of {FLOOD} + {FLOOD} bodies in {took:.2f} s: {answered} answered, "
        f"{FLOOD - answered} at capacity; frontend RSS {before} KiB before, peak +{rss.peak - before} KiB, "
        f"after +{after - before} KiB (bound +{RSS_BOUND_KIB} KiB)"
    )
    assert got_streams == want_streams and not any(finished_early)
    assert answered >= 1
    for (route, _, _), response in zip(under, responses[:FLOOD]):
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "server_at_capacity"
        else:
            assert same_answer(route, answer_of(route, response), expected[route])
    for (_, _, chunked), response in zip(over, responses[FLOOD:]):
        if response.status_code == 429 and chunked:  # counted as it came: the budget may run out first
            continue
        assert_too_large(response.status_code, response.content)
    assert frontend.process.poll() is None and frontend.process.pid == pid  # never restarted
    assert rss.peak - before <= RSS_BOUND_KIB
