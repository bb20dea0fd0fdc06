"""Storms against the real tritonserver: many streams cancelled at random moments, and a KV pool far too
small for the load. Survivors' outputs equal the offline engine's greedy outputs, nothing is lost, and the
KV cache is empty again afterwards. Each test prints its figures."""

from __future__ import annotations

import asyncio
import random
import time

from conftest import SMALL_ENGINE_ARGS, SMALL_MAX_QUEUED

from grpc_helpers import engine_idle, scrape_metrics, wait_until
from pagetron.backend import LLM, SamplingParams
from pagetron.client.errors import TritonRequestError
from pagetron.client.grpc_aio_client import AsyncTritonLLMClient
from pagetron.client.request import GenerateRequest

PROMPTS = [[1, 1000 + 37 * i, 2000 + 11 * i, 3000 + i, 450, 12] for i in range(8)]
STREAMS_PER_CHANNEL = 50


def offline_outputs(llm: LLM, max_tokens: int) -> list[list[int]]:
    """Greedy outputs of the offline engine on the served model (they do not depend on engine args)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


async def run_streams(url: str, count: int, max_tokens: int, cancel_after: dict[int, int]) -> dict:
    """``count`` concurrent streams over PROMPTS; stream i leaves once it has ``cancel_after[i]`` tokens,
    unless the response that brought them was its last (sends that fall behind coalesce tokens)."""
    clients = [AsyncTritonLLMClient(url) for _ in range(-(-count // STREAMS_PER_CHANNEL))]
    params = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}

    async def one(i: int) -> tuple[list[int], str | None]:
        request = GenerateRequest(PROMPTS[i % len(PROMPTS)], params, request_id=f"storm-{i}")
        tokens: list[int] = []
        try:
            async for chunk in clients[i % len(clients)].generate(request, timeout=300):
                tokens += chunk.token_ids
                if i in cancel_after and len(tokens) >= cancel_after[i] and chunk.finish_reason is None:
                    return tokens, "cancelled"
        except TritonRequestError as e:
            return tokens, str(e)
        return tokens, None

    try:
        results = await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for client in clients:
            await client.close()
    return dict(enumerate(results))


def wait_for_idle_kv(metrics_url: str, timeout_s: float = 15) -> dict[str, float]:
    wait_until(lambda: engine_idle(scrape_metrics(metrics_url)), timeout_s)
    return scrape_metrics(metrics_url)  # the callers' assertions show it


def test_cancellation_storm_spares_every_survivor_and_frees_the_cache(triton_server, tiny_llm):
    max_tokens, count = 24, 200
    expected = offline_outputs(tiny_llm, max_tokens)
    rng = random.Random(5)
    cancel_after = {i: rng.randint(1, max_tokens - 1) for i in rng.sample(range(count), count // 2)}
    started = time.monotonic()
    results = asyncio.run(run_streams(triton_server.grpc_url, count, max_tokens, cancel_after))
    seconds = time.monotonic() - started
    survivors = [i for i in results if i not in cancel_after]
    for i in survivors:
        tokens, error = results[i]
        assert error is None, (i, error)
        assert tokens == expected[i % len(PROMPTS)], i
    cancelled = [i for i in cancel_after if results[i][1] == "cancelled"]
    for i in cancel_after:  # what a cancelled stream got before leaving is a prefix of the full output
        tokens, error = results[i]
        if error is None:  # its last response brought its cancel point: it had nothing left to cancel
            assert tokens == expected[i % len(PROMPTS)], i
        else:
            assert error == "cancelled" and tokens == expected[i % len(PROMPTS)][: len(tokens)], (i, error)
    assert len(cancelled) >= len(cancel_after) // 2, f"only {len(cancelled)} streams left mid-generation"
    m = wait_for_idle_kv(triton_server.metrics_url)
    assert m["vllm:gpu_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0
    assert m["vllm:num_requests_waiting"] == 0
    print(
        f"\ncancellation storm: {count} streams, {len(cancelled)} cancelled at random moments, "
        f"{len(survivors)} survivors all equal to offline greedy, KV usage back to 0, {seconds:.1f} s"
    )


def test_preemption_storm_completes_everything_exactly(small_server, tiny_llm):
    max_tokens, count = 40, SMALL_ENGINE_ARGS["max_num_seqs"] + SMALL_MAX_QUEUED
    expected = offline_outputs(tiny_llm, max_tokens)
    # 8 requests of 46 tokens (3 blocks of 16 each), 4 running at a time on a pool of 6 blocks: without the
    # growth reservation the scheduler admits greedily and must preempt (vLLM's behaviour)
    server = small_server
    before = scrape_metrics(server.metrics_url)
    started = time.monotonic()
    results = asyncio.run(run_streams(server.grpc_url, count, max_tokens, {}))
    seconds = time.monotonic() - started
    for i, (tokens, error) in results.items():
        assert error is None, (i, error)
        assert tokens == expected[i % len(PROMPTS)], i
    m = wait_for_idle_kv(server.metrics_url)
    preemptions = m["vllm:num_preemptions_total"] - before.get("vllm:num_preemptions_total", 0)
    assert preemptions > 0
    assert m["vllm:gpu_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0
    print(
        f"\npreemption storm: {count} streams on a 6-block KV pool, {preemptions:.0f} preemptions, "
        f"every output equal to an unconstrained offline run, {seconds:.1f} s"
    )
