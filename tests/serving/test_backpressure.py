"""Backpressure: with max_num_seqs + max_queued_requests requests in flight, a new request is refused at
once with UNAVAILABLE; everything admitted completes in full."""

import threading
import time

import pytest
from conftest import SMALL_ENGINE_ARGS, SMALL_MAX_QUEUED

from grpc_helpers import stream_generate
from model_factory import make_hf_model
from pagetron.backend import LLM, SamplingParams
from pagetron.backend.core.config import EngineConfig
from pagetron.backend.engine.llm_engine import LLMEngine
from pagetron.backend.serving.async_engine import AsyncEngine
from pagetron.backend.serving.request_parser import ParsedRequest
from sinks import RecordingSink


def test_the_queue_bound_refuses_exactly_the_request_past_it(tmp_path):
    folder = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False)
    args = {"model": str(folder), "kv_cache_memory_gb": 0.01, "max_num_seqs": 2}
    params = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
    prompts = [[3 + i, 4, 5] for i in range(4)]
    expected = [o.outputs[0].token_ids for o in LLM(**args).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )]  # fmt: skip
    engine = AsyncEngine(LLMEngine(EngineConfig(**args)), max_queued_requests=1)
    engine.start()
    sinks = [RecordingSink() for _ in prompts]
    try:
        for i in range(4):  # two seats and one place in the queue: the fourth is refused
            engine.submit(f"r{i}", ParsedRequest(prompt=prompts[i], params=params, stream=True), sinks[i])
        assert sinks[3].done.is_set(), "the refusal must be immediate"
        message, code = sinks[3].error
        assert code == "UNAVAILABLE" and message.startswith(
            "the server is at capacity: 3 requests in flight (max_num_seqs 2 + max_queued_requests 1)"
        )
        for sink in sinks[:3]:
            sink.wait(60)
    finally:
        engine.shutdown()
    for sink, tokens in zip(sinks[:3], expected):
        assert sink.error is None and sink.tokens == tokens


def test_unbounded_queue_and_bad_bounds():
    with pytest.raises(ValueError, match="max_queued_requests"):
        AsyncEngine(engine=None, max_queued_requests=-1)


def test_server_refuses_past_its_queue_and_keeps_serving(small_server):
    server = small_server
    params = {"max_tokens": 48, "ignore_eos": True, "temperature": 0}
    results = [None] * 12

    def one(i: int) -> None:
        started = time.monotonic()
        r = stream_generate(server.grpc_url, f"Story number {i}:", params, stream=True, timeout=120)
        results[i] = (r, time.monotonic() - started)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    refused = [(r, s) for r, s in results if r.error is not None]
    served = [r for r, _ in results if r.error is None]
    capacity = SMALL_ENGINE_ARGS["max_num_seqs"] + SMALL_MAX_QUEUED  # 8 in flight at most
    assert refused and capacity <= len(served) < len(results), [r.error for r, _ in results]
    for r, seconds in refused:
        assert "at capacity" in r.error and seconds < 5, (r.error, seconds)
    assert all(len(r.token_ids) == 48 for r in served)
    after = stream_generate(server.grpc_url, "Hello", {"max_tokens": 2}, timeout=60)
    assert after.error is None
    print(f"\nbackpressure: {len(served)} served, {len(refused)} refused at once")
