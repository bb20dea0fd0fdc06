"""Readiness tells the truth: an engine fault (exception or hang) fails in-flight requests with a clear
error and the model stops being READY within seconds; explicit unload frees the stub and load works again."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from conftest import start_server

from grpc_helpers import stream_generate, wait_until


def probe(server, timeout: float = 10) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pagetron.backend.cli",
            "probe",
            "--url",
            server.grpc_url,
            "--timeout",
            str(timeout),
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )


@pytest.mark.parametrize(
    "fault, expected_error",
    [("raise-after:3", "engine step failed"), ("hang-after:3", "made no progress")],
)
def test_engine_fault_fails_requests_and_drops_readiness(tmp_path, fault, expected_error):
    server = start_server(tmp_path, parameters={"stall_timeout_s": "6"}, env={"PAGETRON_FAULT": fault})
    try:
        assert server.is_ready() and probe(server).returncode == 0
        started = time.monotonic()
        r = stream_generate(
            server.grpc_url, "Hello there", {"max_tokens": 20, "ignore_eos": True}, stream=True, timeout=30
        )
        assert r.error is not None and expected_error in r.error
        assert time.monotonic() - started < 15  # a clear error, not a hang
        assert wait_until(lambda: not server.is_ready(), 15), "the model kept reporting READY"
        assert probe(server).returncode != 0
        after = stream_generate(server.grpc_url, "Hello", {"max_tokens": 2}, timeout=30)
        assert after.error is not None
    finally:
        server.stop()


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=b"{}", method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_admin_apis_refuse_requests_without_the_key(tmp_path):
    """Model control, shared memory, trace and logging need the admin key on HTTP and gRPC; inference
    does not. The key was generated into an owner-only file beside the repository."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = start_server(tmp_path)
    try:
        assert server.admin_key_file == tmp_path / "admin-key"
        assert server.admin_key_file.read_text().strip() == server.admin_key
        assert server.admin_key_file.stat().st_mode & 0o777 == 0o600
        base = f"http://{server.http_url}/v2"
        wrong = {"admin-key": "not-the-key"}
        for path in ("repository/models/llm/unload", "repository/index", "systemsharedmemory/status"):
            assert http_status(f"{base}/{path}") == 403, path
            assert http_status(f"{base}/{path}", wrong) == 403, path
        assert http_status(f"{base}/repository/index", server.admin_headers) == 200
        client = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("llm")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.register_system_shared_memory("x", "/pagetron-test", 64)
        index = client.get_model_repository_index(headers=server.grpc_admin_headers)
        assert [m.name for m in index.models] == ["llm"]
        assert server.is_ready()  # nothing was unloaded
        r = stream_generate(server.grpc_url, "Hello", {"max_tokens": 2})  # inference needs no key
        assert r.error is None
    finally:
        server.stop()


def test_explicit_unload_frees_the_stub_and_load_serves_again(tmp_path):
    server = start_server(tmp_path)
    try:
        [stub] = server.stub_pids()
        base = f"http://{server.http_url}/v2/repository/models/llm"
        urllib.request.urlopen(
            urllib.request.Request(f"{base}/unload", data=b"{}", method="POST", headers=server.admin_headers),
            timeout=60,
        )
        assert wait_until(lambda: not server.is_ready(), 30)
        assert wait_until(lambda: stub not in server.stub_pids(), 30), (
            "the stub (and the engine's memory) stayed"
        )
        load = urllib.request.Request(f"{base}/load", data=b"{}", method="POST", headers=server.admin_headers)
        urllib.request.urlopen(load, timeout=300)
        assert server.is_ready()
        r = stream_generate(
            server.grpc_url,
            "Once upon a time, there was a little girl named",
            {"temperature": 0, "max_tokens": 3},
        )
        assert r.error is None and r.text == " Emma who loved"
        index = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    f"http://{server.http_url}/v2/repository/index",
                    data=b"{}",
                    method="POST",
                    headers=server.admin_headers,
                )
            ).read()
        )
        assert [m["state"] for m in index if m["name"] == "llm"] == ["READY"]
    finally:
        server.stop()
