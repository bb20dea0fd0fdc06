"""`pagetron serve --tensor-parallel-size 2` (the tiny Llama: 4 heads, 2 KV heads, so one KV head per rank)
through the real tritonserver, and serve's self-healing on it. The stub is rank 0 (the driver); rank 1 is
a child process of the stub. Faults come from a file read at each load (PAGETRON_FAULT=file:PATH). The
serve is the session's `tp_serve` (conftest.py), which the HTTP guard tests use first.

- concurrent streams give the greedy tokens of the one-rank offline engine;
- a cancelled stream frees its KV blocks: the scheduler owns the block table every rank indexes, so the
  gauge at 0 means no rank holds the request's cache;
- a killed rank fails the in-flight stream within seconds naming the rank, readiness drops, the model
  unloads itself and serve reloads it: the first reload fails (an invalid fault spec), serve retries
  after 1 s, and the model serves the same tokens again, with new ranks and the old stub gone;
- a stalled engine (fault injection, armed at that reload) fails its request, unloads itself and is
  reloaded by serve without an operator;
- an operator's unload takes the stub and its rank down and is left alone;
- SIGTERM leaves no process (no rank outlives serve).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import time

import pytest
import tritonclient.grpc as grpcclient

from grpc_helpers import (
    engine_idle,
    make_inputs,
    pids_matching,
    scrape_metrics,
    stream_generate,
    wait_until,
)
from pagetron.backend import SamplingParams
from serve_process import alive, ranks_of

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Tensor parallelism"]
MAX_TOKENS = 12
STALL_AFTER = 60  # steps: warm-up and the concurrent streams pass (4 x 12 tokens at most), then a stall


def heals(serve, times: int) -> bool:
    """serve logged its ``times``-th successful reload, and the model is READY."""
    return (
        wait_until(lambda: serve.text().count("reloaded and READY again") >= times, 180, 0.2)
        and serve.ready()
    )


@pytest.fixture(scope="module")
def expected(tiny_llm) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = tiny_llm.generate(PROMPTS, params, use_tqdm=False)
    return {p: o.outputs[0].token_ids for p, o in zip(PROMPTS, outputs)}


def concurrent_streams(url: str) -> dict[str, list[int]]:
    from concurrent.futures import ThreadPoolExecutor

    sampling = {"temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = pool.map(lambda p: stream_generate(url, p, sampling, stream=True), PROMPTS)
        results = dict(zip(PROMPTS, streams))
    assert all(r.error is None for r in results.values()), results
    return {p: r.token_ids for p, r in results.items()}


def test_streams_equal_one_rank(tp_serve, expected):
    assert len(ranks_of(tp_serve)) == 1
    assert "tensor parallel: 2 ranks" in tp_serve.text()
    assert concurrent_streams(tp_serve.grpc_url) == expected


def test_a_cancelled_stream_frees_its_kv_blocks(tp_serve):
    metrics_url = f"http://127.0.0.1:{tp_serve.ports['metrics']}/metrics"
    client = grpcclient.InferenceServerClient(tp_serve.grpc_url)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    sampling = {"max_tokens": 1500, "ignore_eos": True}
    client.async_stream_infer("llm", make_inputs("A long story:", sampling, stream=True))
    for _ in range(3):
        _, error = got.get(timeout=60)
        assert error is None
    assert wait_until(lambda: scrape_metrics(metrics_url)["vllm:gpu_cache_usage_perc"] > 0, 5, 0.05)
    client.stop_stream(cancel_requests=True)
    client.close()
    assert wait_until(lambda: engine_idle(scrape_metrics(metrics_url)), 10, 0.1), scrape_metrics(metrics_url)


def test_a_killed_rank_fails_the_stream_drops_readiness_and_serve_reloads(tp_serve, expected, tp_fault_file):
    fault_file = tp_fault_file
    [stub] = pids_matching(f"repo-{tp_serve.ports['grpc']}/llm")
    [rank] = ranks_of(tp_serve)
    client = grpcclient.InferenceServerClient(tp_serve.grpc_url)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    sampling = {"max_tokens": 1500, "ignore_eos": True}
    client.async_stream_infer("llm", make_inputs("A long story:", sampling, stream=True))
    try:
        _, error = got.get(timeout=60)
        assert error is None
        fault_file.write_text("not-a-fault")  # the first reload fails ...
        os.kill(rank, signal.SIGKILL)
        killed_at = time.monotonic()
        while True:  # tokens already on their way, then the error
            _, error = got.get(timeout=30)
            if error is not None:
                break
        failed_after = time.monotonic() - killed_at
    finally:
        client.stop_stream()
        client.close()
    assert failed_after < 10, failed_after
    assert f"tensor-parallel rank 1 (pid {rank}) exited with code -9" in error.message(), error.message()
    assert wait_until(lambda: not tp_serve.ready(), 20, 0.05), "readiness never dropped"
    # ... which serve reports, then retries after a second; the one after that loads, with a stall armed
    # for the next test (after warm-up and the streams below)
    assert wait_until(lambda: "reloading model 'llm' failed" in tp_serve.text(), 120, 0.1), tp_serve.text()
    fault_file.write_text(f"hang-after:{STALL_AFTER}")
    assert heals(tp_serve, 1), tp_serve.text()[-3000:]
    text = tp_serve.text()
    assert "after an engine fault (engine step failed: WorkerFailed: tensor-parallel rank 1" in text
    assert "next attempt in 1 s" in text
    attempts = [int(n) for n in re.findall(r"reloading model 'llm' \(attempt (\d+)\)", text)]
    assert attempts == list(range(1, len(attempts) + 1)) and len(attempts) >= 2, attempts
    assert not alive(stub) and len(new := ranks_of(tp_serve)) == 1 and new != [rank]
    assert concurrent_streams(tp_serve.grpc_url) == expected


def test_a_stalled_engine_fails_its_request_unloads_and_serve_reloads_it(tp_serve, expected, tp_fault_file):
    fault_file = tp_fault_file
    assert (
        "ready (cpu x 2 ranks"
        in tp_serve.text().rsplit(f"fault injection armed: hang-after:{STALL_AFTER}", 1)[1]
    )
    fault_file.write_text("")  # the reload after the stall is clean
    r = stream_generate(tp_serve.grpc_url, "Hello there", {"max_tokens": 100, "ignore_eos": True}, timeout=30)
    assert r.error is not None and "made no progress" in r.error, r
    assert wait_until(lambda: not tp_serve.ready(), 20, 0.05), "the stalled model kept reporting READY"
    assert heals(tp_serve, 2), tp_serve.text()[-3000:]
    assert "unloaded itself after an engine fault (the engine made no progress" in tp_serve.text()
    assert concurrent_streams(tp_serve.grpc_url) == expected


def test_an_operators_unload_is_left_alone_and_takes_the_ranks_down(tp_serve):
    """The module's last test: the model stays unloaded."""
    [stub] = pids_matching(f"repo-{tp_serve.ports['grpc']}/llm")
    [rank] = ranks_of(tp_serve)
    reloads = tp_serve.text().count("reloading model 'llm' (attempt")
    assert tp_serve.model_request("unload") == 200  # through the HTTP guard, with the admin key
    gone = wait_until(lambda: not alive(stub) and not alive(rank), 30)
    assert gone, "the stub or its rank outlived the unload"
    assert wait_until(lambda: "leaving it unloaded" in tp_serve.text(), 30, 0.1), tp_serve.text()[-3000:]
    # serve has looked and decided; it checks every half second, so a reload would have started by now
    assert not wait_until(tp_serve.ready, 2, 0.2), "serve reloaded a model an operator had unloaded"
    assert tp_serve.text().count("reloading model 'llm' (attempt") == reloads
