"""`pagetron serve`'s HTTP guard (nginx on the public HTTP port, tritonserver's own listener on an internal
loopback port): with streams in flight, an oversize body of any content type (among them the 4.2 MB
form-urlencoded body that segfaults a bare tritonserver 2.51) is refused with 413 at once, before it is
read; a body of exactly the limit is answered; a form-urlencoded body too large for Triton's parser
reaches it harmlessly (sent as JSON); generate_stream's events pass one by one; every stream ends with
its exact expected output; tritonserver never restarts and readiness never drops.

The session's `pagetron serve` (`tp_serve` in conftest.py: the tiny model, tensor parallel 2), before the
tensor-parallel tests fault it."""

from __future__ import annotations

import http.client
import json
import threading
import time

import httpx
import pytest
from conftest import TP_SERVE_MAX_MODEL_LEN as MAX_MODEL_LEN

from grpc_helpers import stream_generate, wait_until
from pagetron.backend import SamplingParams
from pagetron.backend.serving import http_guard
from pagetron.backend.serving.launcher import LaunchError, free_port, port_holders
from pagetron.backend.serving.limits import request_body_limit
from serve_process import Serve

STREAM_TOKENS = 800  # seconds of streaming on the tiny model (CPU attention slows as the context grows)
LIMIT = request_body_limit(MAX_MODEL_LEN)  # serve's default (1.5 MiB)
FORM = "application/x-www-form-urlencoded"
CRASHING_FORM_BYTES = 4_200_000  # a bare tritonserver 2.51 segfaults on a form body this large


@pytest.fixture
def guarded(tp_serve) -> Serve:
    assert tp_serve.ready(), "the session's serve is not READY (the tensor-parallel tests end unloaded)"
    return tp_serve


def post_raw(
    port: int,
    path: str,
    body: bytes,
    content_type: str | None,
    chunked: bool = False,
    send_body: bool = True,
) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one POST; ``chunked`` sends the body in 64 KiB chunks without a length;
    ``send_body`` False sends only the headers (so a 413 shows the body was never read)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    started = time.monotonic()
    try:
        connection.putrequest("POST", path, skip_accept_encoding=True)
        if content_type is not None:
            connection.putheader("Content-Type", content_type)
        if chunked:
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            for i in range(0, len(body), 1 << 16):
                part = body[i : i + (1 << 16)]
                try:
                    connection.send(b"%x\r\n%s\r\n" % (len(part), part))
                except (BrokenPipeError, ConnectionResetError):  # refused mid-body, as it should be
                    break
            else:
                connection.send(b"0\r\n\r\n")
        else:
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders()
            if send_body:
                connection.send(body)
        response = connection.getresponse()
        return response.status, response.read(), time.monotonic() - started
    finally:
        connection.close()


class SseStream(threading.Thread):
    """One generate_stream request through the guard, read event by event."""

    def __init__(self, url: str, prompt: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.prompt, self.max_tokens = url, prompt, max_tokens
        self.token_ids: list[int] = []
        self.events = 0
        self.status: int | None = None
        self.error: str | None = None

    def run(self) -> None:
        body = {
            "text_input": self.prompt,
            "stream": True,
            "parameters": {"max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0},
        }
        try:
            with httpx.stream(
                "POST", f"{self.url}/v2/models/llm/generate_stream", json=body, timeout=120
            ) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        ids = event.get("output_ids", [])
                        self.token_ids += ids if isinstance(ids, list) else [ids]
                        self.events += 1
        except Exception as e:  # noqa: BLE001 (reported by the test)
            self.error = repr(e)


class ReadinessWatch(threading.Thread):
    """Polls readiness through the guard until stopped; counts every answer that is not 200."""

    def __init__(self, serve: Serve):
        super().__init__(daemon=True)
        self.serve, self.stop, self.polls, self.failures = serve, threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.wait(0.1):
            status = self.serve.status("/v2/models/llm/ready")
            self.polls += 1
            if status != 200:
                self.failures.append(status)


def test_oversize_bodies_get_413_at_once_while_streams_run(guarded, tiny_llm, tmp_path):
    serve = guarded
    restarts = serve.text().count("restarting")
    [server_pid] = serve.tritonserver_pids()
    nginx_pids = sorted(pid for pid, _ in port_holders(serve.ports["http"]))
    assert nginx_pids and all("nginx" in cmd for _, cmd in port_holders(serve.ports["http"]))
    assert serve.internal_port() not in serve.ports.values()

    params = SamplingParams(temperature=0, max_tokens=STREAM_TOKENS, ignore_eos=True)
    prompts = ["Once upon a time", "The capital of France is", "Tell me a story."]
    expected = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, params, use_tqdm=False)]
    watch = ReadinessWatch(serve)
    watch.start()
    streams = [SseStream(serve.url, p, STREAM_TOKENS) for p in prompts[:2]]
    grpc_result: dict = {}
    grpc_stream = threading.Thread(
        target=lambda: grpc_result.update(
            r=stream_generate(
                serve.grpc_url,
                prompts[2],
                {"temperature": 0, "max_tokens": STREAM_TOKENS, "ignore_eos": True},
                timeout=120,
            )  # fmt: skip
        )
    )
    for thread in (*streams, grpc_stream):
        thread.start()
    try:
        assert wait_until(lambda: all(s.events >= 1 for s in streams), 60, 0.01), "no stream got an event"
        events_before = [s.events for s in streams]

        # oversize: 413 with the guard's message, at once, whatever the content type or framing
        port = serve.ports["http"]
        path = "/v2/models/llm/generate"
        for size, content_type, chunked in [
            (CRASHING_FORM_BYTES, FORM, False),
            (LIMIT + 1, FORM, False),
            (LIMIT + 1, "application/json", False),
            (LIMIT + 1, "text/plain", False),
            (LIMIT + 1, "multipart/form-data; boundary=x", False),
            (LIMIT + 1, None, False),
            (CRASHING_FORM_BYTES, FORM, True),
            (LIMIT + 1, "application/json", True),
        ]:
            status, body, seconds = post_raw(port, path, b"a" * size, content_type, chunked)
            case = (size, content_type, "chunked" if chunked else "length")
            assert status == 413 and b"--max-request-bytes" in body, (case, status, body[:300])
            assert seconds < 5, (case, seconds)
        # refused from the headers alone: the body is never sent, yet the answer comes
        status, _, seconds = post_raw(port, path, b"a" * (100 << 20), FORM, send_body=False)
        assert status == 413 and seconds < 5
        # the same on an unknown model and on the restricted API (which a bare Triton crashed on too)
        for other in ("/v2/models/nope/generate", "/v2/repository/index"):
            assert post_raw(port, other, b"a" * CRASHING_FORM_BYTES, FORM)[0] == 413, other

        # a body of exactly the limit is answered by Triton, in both types: the prompt cannot fit the
        # context, so the model refuses it (400) before tokenizing
        padding = LIMIT - len(json.dumps({"text_input": ""}).encode())
        borderline = json.dumps({"text_input": "a" * padding}).encode()
        assert len(borderline) == LIMIT
        for content_type in ("application/json", FORM):
            status, body, _ = post_raw(port, path, borderline, content_type)
            assert status == 400 and b"INVALID_ARG" in body, (content_type, status, body[:300])

        # the admin key still passes through the guard, and the restricted API still wants it
        assert serve.status("/v2/health/ready") == 200
        assert httpx.post(f"{serve.url}/v2/repository/index", timeout=10).status_code == 403
        index = httpx.post(f"{serve.url}/v2/repository/index", headers=serve.admin_headers, timeout=10)
        assert index.status_code == 200 and [m["name"] for m in index.json()] == ["llm"]
        events_after = [s.events for s in streams]

        # a form body too large for Triton's own parser, under a higher limit: Triton gets it as JSON and
        # answers (a second guard, on the same tritonserver)
        bigger = http_guard.HttpGuard(
            "127.0.0.1", free_port(), serve.internal_port(), 8_000_000, tmp_path / "guard"
        ).start()
        try:
            for chunked in (False, True):
                status, body, _ = post_raw(bigger.port, path, b"a" * CRASHING_FORM_BYTES, FORM, chunked)
                assert b"failed to parse the request JSON" in body, (chunked, status, body[:300])
        finally:
            bigger.stop()
        assert not bigger.running()
    finally:
        for thread in (*streams, grpc_stream):
            thread.join(120)
        watch.stop.set()
        watch.join()

    for stream, want in zip(streams, expected[:2]):
        assert stream.error is None and stream.status == 200, (stream.error, stream.status)
        assert stream.token_ids == want
    # event by event: each stream had delivered part of its output before the bodies above were tried,
    # and was still streaming once they had all been answered
    finals = [s.events for s in streams]
    assert all(0 < a <= b < f for a, b, f in zip(events_before, events_after, finals)), (
        events_before,
        events_after,
        finals,
    )
    r = grpc_result["r"]
    assert r.error is None and r.token_ids == expected[2]
    assert watch.polls > 10 and watch.failures == []
    assert serve.tritonserver_pids() == [server_pid] and serve.process.poll() is None
    assert sorted(pid for pid, _ in port_holders(serve.ports["http"])) == nginx_pids
    assert serve.text().count("restarting") == restarts


def test_a_missing_nginx_is_a_clear_error_naming_the_package(monkeypatch):
    monkeypatch.setattr(http_guard.shutil, "which", lambda *a, **k: None)
    with pytest.raises(LaunchError, match="apt-get install nginx"):
        http_guard.find_nginx()
