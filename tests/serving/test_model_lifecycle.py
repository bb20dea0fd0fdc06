"""A served model's life: strict engine arguments at load; readiness tells the truth (an engine fault,
exception or hang, fails in-flight requests with a clear error and the model stops being READY within
seconds); explicit unload frees the stub and load works again; SIGINT with streams in flight ends each
stream and leaves no process behind.

One server for the module: its fault is read from a file each time the model loads
(PAGETRON_FAULT=file:PATH), so the scenarios run one after another with a reload in between, and the
last test stops it."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import start_server

from grpc_helpers import scrape_metrics, stream_generate, wait_until
from model_factory import FULL_ONLY
from pagetron.backend import SamplingParams
from pagetron.backend.serving.constants import FAULT_ENV


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("faults")
    fault_file = tmp / "fault"
    fault_file.write_text("")
    server = start_server(
        tmp,
        {"model": str(tiny_model_dir)},  # faults are about the server: a tiny model reloads quickly
        parameters={"stall_timeout_s": "3"},  # a tiny model's steps take milliseconds
        env={FAULT_ENV: f"file:{fault_file}"},
    )
    server.fault_file, server.loaded_fault = fault_file, ""
    yield server
    server.stop()


def model_request(server, action: str, timeout: float = 300) -> None:
    url = f"http://{server.http_url}/v2/repository/models/llm/{action}"
    request = urllib.request.Request(url, data=b"{}", method="POST", headers=server.admin_headers)
    urllib.request.urlopen(request, timeout=timeout)


def load_with_fault(server, fault: str) -> None:
    """Unloads the model if it is loaded (waiting for its stub to go), then loads it with ``fault``."""
    if server.is_ready() and server.loaded_fault == fault:
        return
    server.fault_file.write_text(fault)
    server.loaded_fault = fault
    if server.is_ready():
        stubs = server.stub_pids()
        model_request(server, "unload")
        assert wait_until(lambda: not set(stubs) & set(server.stub_pids()), 60), "the old stub stayed"
    model_request(server, "load")
    assert server.is_ready()


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


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=b"{}", method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_admin_apis_refuse_requests_without_the_key(fault_server):
    """Model control, shared memory, trace and logging need the admin key on HTTP and gRPC; inference
    does not. The key was generated into an owner-only file beside the repository."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = fault_server
    load_with_fault(server, "")
    assert server.admin_key_file == server.repository.parent / "admin-key"
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


def test_explicit_unload_frees_the_stub_and_load_serves_again(fault_server, tiny_llm):
    server = fault_server
    load_with_fault(server, "")
    [stub] = server.stub_pids()
    model_request(server, "unload", timeout=60)
    assert wait_until(lambda: not server.is_ready(), 30)
    assert wait_until(lambda: stub not in server.stub_pids(), 30), "the stub (and the engine's memory) stayed"
    model_request(server, "load")
    assert server.is_ready()
    prompt = "Once upon a time, there was a little girl named"
    r = stream_generate(server.grpc_url, prompt, {"temperature": 0, "max_tokens": 3})
    [expected] = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert r.error is None and r.token_ids == expected.outputs[0].token_ids
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


@pytest.mark.parametrize(
    "fault, expected_error",
    # a hang is also served by `pagetron serve` in test_tensor_parallel_serving.py, healed there
    [
        ("raise-after:3", "engine step failed"),
        pytest.param("hang-after:3", "made no progress", marks=FULL_ONLY),
    ],
)
def test_engine_fault_fails_requests_and_drops_readiness(fault_server, fault, expected_error):
    server = fault_server
    load_with_fault(server, fault)  # warm-up and probe take the first steps; the fault comes after 3
    assert probe(server).returncode == 0
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


def test_unknown_engine_argument_fails_the_load_naming_the_key(tmp_path):
    server = start_server(tmp_path, engine_args={"max_num_seq": 4}, wait=False)
    try:
        assert server.process.wait(120) != 0  # the only model failed to load: the server exits
    finally:
        server.stop()
    log = (tmp_path / "tritonserver.log").read_text()
    assert "engine argument 'max_num_seq': unknown engine argument" in log


def test_sigint_with_streams_in_flight_ends_each_stream_and_leaves_no_process(fault_server):
    """The module's last test: it stops the server."""
    server = fault_server
    load_with_fault(server, "")
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                stream_generate(
                    server.grpc_url,
                    "Tell me a story.",
                    {"max_tokens": 4000, "ignore_eos": True},
                    stream=True,
                    timeout=60,
                )
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    group = server.pid
    deadline = time.monotonic() + 60
    while scrape_metrics(server.metrics_url).get("vllm:num_requests_running", 0) < 3:
        assert time.monotonic() < deadline, "the three streams never ran together"
        time.sleep(0.1)
    t0 = time.monotonic()
    code = server.stop()  # what Ctrl-C on `pagetron serve` does: drain (3 s grace here), then SIGINT
    for t in threads:
        t.join(90)
    assert code == 0 and time.monotonic() - t0 < 20
    assert len(results) == 3
    for r in results:
        # each stream ended with its whole output or a clear error, never a hang
        assert (
            r.error is None and len(r.token_ids) == 4000
        ) or r.error == "[UNAVAILABLE] the server is shutting down", r
    assert any(r.error for r in results)  # 4,000 tokens take longer than the 3 s grace, even on a tiny model
    assert not _stub_running(group)


def _stub_running(group: int) -> bool:
    out = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True)
    return bool(out.stdout.strip())
