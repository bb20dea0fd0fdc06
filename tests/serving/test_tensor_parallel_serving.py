"""Tensor parallelism served by `pagetron serve --tensor-parallel-size 2` (the tiny Llama: 4 heads, 2 KV
heads, so one KV head per rank) through the real tritonserver. The stub is rank 0 (the driver); rank 1 is
a child process of the stub.

- concurrent streams give the greedy tokens of the one-rank offline engine;
- a cancelled stream frees its KV blocks: the scheduler owns the block table every rank indexes, so the
  gauge at 0 means no rank holds the request's cache;
- a killed rank fails the in-flight stream within seconds naming the rank, readiness drops, serve
  reloads the model (new ranks) and it serves the same tokens again; a rank killed while the engine is
  idle drops readiness as well (the watchdog polls the executor's health);
- an operator's unload takes rank 1 down with the stub; SIGTERM leaves no process.
"""

from __future__ import annotations

import os
import queue
import signal
import time
from pathlib import Path

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
from serve_process import start_serve, stop_serve

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Tensor parallelism"]
MAX_TOKENS = 12
RANK_PATTERN = "pagetron.backend.executor.multiproc"
SEEN_RANKS: set[int] = set()  # every rank process the tests saw; none may outlive serve


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def ranks_of(serve) -> list[int]:
    """The tensor-parallel rank processes (beyond rank 0, the stub) of this serve's model."""
    [stub] = pids_matching(f"repo-{serve.ports['grpc']}/llm")
    ranks = [pid for pid in pids_matching(RANK_PATTERN) if _parent_or_none(pid) == stub]
    SEEN_RANKS.update(ranks)
    return ranks


def _parent_or_none(pid: int) -> int | None:
    try:
        return parent(pid)
    except OSError:
        return None


@pytest.fixture(scope="module")
def tp_serve(tmp_path_factory, tiny_model_dir):
    serve = start_serve(
        tmp_path_factory.mktemp("tp-serve"),
        tiny_model_dir,
        "--tensor-parallel-size", "2", "--max-model-len", "2048",
    )  # fmt: skip
    yield serve
    code = stop_serve(serve)
    assert code == 0, serve.text()[-3000:]
    assert not [pid for pid in SEEN_RANKS if alive(pid)], "a rank outlived serve's SIGTERM"


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


def test_a_killed_rank_fails_the_stream_drops_readiness_and_serve_reloads(tp_serve, expected):
    [rank] = ranks_of(tp_serve)
    client = grpcclient.InferenceServerClient(tp_serve.grpc_url)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    sampling = {"max_tokens": 1500, "ignore_eos": True}
    client.async_stream_infer("llm", make_inputs("A long story:", sampling, stream=True))
    try:
        _, error = got.get(timeout=60)
        assert error is None
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

    # serve reloads the model: new ranks, the same tokens
    healed = wait_until(lambda: "reloaded and READY again" in tp_serve.text(), 180, 0.2)
    assert healed and tp_serve.ready(), tp_serve.text()[-3000:]
    assert len(new := ranks_of(tp_serve)) == 1 and new != [rank]
    assert concurrent_streams(tp_serve.grpc_url) == expected


def test_a_rank_killed_while_idle_drops_readiness_and_serve_reloads(tp_serve, expected):
    [rank] = ranks_of(tp_serve)
    reloads = tp_serve.text().count("reloaded and READY again")
    os.kill(rank, signal.SIGKILL)
    assert wait_until(lambda: not tp_serve.ready(), 20, 0.05), "readiness never dropped"
    healed = wait_until(lambda: tp_serve.text().count("reloaded and READY again") > reloads, 180, 0.2)
    assert healed and tp_serve.ready(), tp_serve.text()[-3000:]
    assert f"tensor-parallel rank 1 (pid {rank}) exited with code -9" in tp_serve.text()
    assert concurrent_streams(tp_serve.grpc_url) == expected


def test_an_operators_unload_takes_the_ranks_down_and_load_brings_them_back(tp_serve, expected):
    [stub] = pids_matching(f"repo-{tp_serve.ports['grpc']}/llm")
    [rank] = ranks_of(tp_serve)
    assert tp_serve.model_request("unload") == 200
    gone = wait_until(lambda: not pids_matching(f"repo-{tp_serve.ports['grpc']}/llm") and not alive(rank), 30)
    assert gone, (stub, rank)
    assert tp_serve.model_request("load") == 200
    assert tp_serve.ready() and len(ranks_of(tp_serve)) == 1
    assert concurrent_streams(tp_serve.grpc_url) == expected


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
