"""Start-up and shutdown: strict engine arguments, and SIGINT with streams in flight leaves nothing behind."""

from __future__ import annotations

import subprocess
import threading
import time

from conftest import start_server

from grpc_helpers import scrape_metrics, stream_generate


def test_unknown_engine_argument_fails_the_load_naming_the_key(tmp_path):
    server = start_server(tmp_path, engine_args={"max_num_seq": 4}, wait=False)
    try:
        assert server.process.wait(120) != 0  # the only model failed to load: the server exits
    finally:
        server.stop()
    log = (tmp_path / "tritonserver.log").read_text()
    assert "engine argument 'max_num_seq': unknown engine argument" in log


def test_sigint_with_streams_in_flight_ends_each_stream_and_leaves_no_process(tmp_path, tiny_model_dir):
    server = start_server(tmp_path, {"model": str(tiny_model_dir)})
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
