"""Tensor parallelism on the CPU (gloo): TP ranks give the greedy tokens of one rank, with prefix caching,
chunked prefill and preemption forced, for a tiny Llama (TP 2, and TP 4 with KV heads replicated) and the
bundled SmolLM2 (TP 3: 9 heads, 3 KV heads); ranks on a second "host" started by `pagetron worker`; a
rank that dies fails the step with a clear error. Where a greedy token differs, the test shows it is a
near-tie (the two best logprobs closer than NEAR_TIE), not a bug.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from model_factory import FULL_ONLY, make_hf_model
from pagetron.backend import LLM, ConfigError, SamplingParams
from pagetron.backend.executor.multiproc import Rank, WorkerFailed, exited_ranks, free_address

NEAR_TIE = 1e-3  # fp32 sums in another order move a logprob by far less than this
LOGPROB_TOLERANCE = 1e-4

CONFIGS = [
    {"block_size": 4, "max_num_seqs": 5},  # sequences join and leave mid-run; prefix caching on
    {"block_size": 4, "max_num_batched_tokens": 8, "max_num_seqs": 8},  # chunked prefill
    {"block_size": 4, "num_kv_blocks": 14, "max_num_seqs": 8, "reserve_kv_for_growth": False},  # preemption
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with 4 attention heads and 2 KV heads (GQA)."""
    return str(
        make_hf_model(tmp_path_factory.mktemp("tp"), "llama", num_kv_heads=2, tie_word_embeddings=False)
    )


def prompts_and_params(seed: int = 7):
    import random

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 30))] for _ in range(8)]
    prompts.append(prompts[0] + [5, 6, 7])  # shares a prefix with the first: a cache hit
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(4, 12), logprobs=2) for _ in prompts]
    return [{"prompt_token_ids": p} for p in prompts], params


def generate(llm: LLM, prompts, params) -> list:
    try:
        return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.engine.shutdown()


def assert_same_or_near_tie(ours, reference) -> None:
    """Greedy tokens equal, logprobs within LOGPROB_TOLERANCE; a differing token must be a near-tie."""
    for i, (a, b) in enumerate(zip(ours, reference)):
        for step, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:
                best = sorted((lp.logprob for lp in b.logprobs[step].values()), reverse=True)
                margin = best[0] - best[1]
                assert margin < NEAR_TIE, f"prompt {i} step {step}: {x} != {y} with a margin of {margin}"
                break  # past a near-tie the two continuations differ legitimately
            for token, lp in b.logprobs[step].items():
                assert abs(a.logprobs[step][token].logprob - lp.logprob) < LOGPROB_TOLERANCE, (i, step)
        else:
            assert len(a.token_ids) == len(b.token_ids)


# TP 4: every rank holds one of the 2 KV heads
CASES = [(2, args) for args in CONFIGS] + [pytest.param(4, CONFIGS[2], marks=FULL_ONLY)]


@pytest.mark.parametrize(
    "tp, args", CASES, ids=["tp2-prefix-cache", "tp2-chunked-prefill", "tp2-preemption", "tp4-kv-replicated"]
)
def test_tiny_llama_tensor_parallel_equals_one_rank(tiny, tp, args):
    prompts, params = prompts_and_params()
    reference = generate(LLM(tiny, **args), prompts, params)
    llm = LLM(tiny, tensor_parallel_size=tp, **args)
    engine = llm.engine
    ours = generate(llm, prompts, params)
    assert_same_or_near_tie(ours, reference)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if "num_kv_blocks" in args:
        assert engine.scheduler.num_preemptions > 0


@FULL_ONLY  # three processes load and dequantize the GGUF (~12 s); the tiny TP 2 cases cover the paths
def test_smollm2_tp3_equals_one_rank(smollm):
    """9 heads and 3 KV heads over 3 ranks: 3 and 1 each."""
    questions = ["What is the capital of France?", "Why do cats purr?"]
    prompts = [{"prompt_token_ids": smollm.encode_chat([{"role": "user", "content": q}])} for q in questions]
    prompts.append({"prompt_token_ids": smollm.tokenizer("Once upon a time, there was").input_ids})
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
    reference = [o.outputs[0] for o in smollm.generate(prompts, params, use_tqdm=False)]
    ours = generate(LLM(tensor_parallel_size=3, kv_cache_memory_gb=0.1), prompts, params)
    assert_same_or_near_tie(ours, reference)


def test_a_size_that_does_not_divide_the_heads_is_a_config_error(tiny):
    with pytest.raises(ConfigError) as e:
        LLM(tiny, tensor_parallel_size=3)  # 4 heads, 2 KV heads, intermediate 128
    assert e.value.key == "tensor_parallel_size" and "4 attention heads" in str(e.value)


def test_ranks_on_a_second_host_started_by_pagetron_worker(tiny):
    """The second host's worker finds the engine through torch.distributed's environment (MASTER_ADDR,
    MASTER_PORT, NODE_RANK); the engine is given the same address as a tcp:// init method."""
    prompts, params = prompts_and_params(seed=11)
    reference = generate(LLM(tiny, block_size=4), prompts, params)
    host, port = free_address().rsplit(":", 1)
    command = [sys.executable, "-m", "pagetron.backend.cli", "worker", "--model", tiny, "--block-size", "4",
               "--tensor-parallel-size", "2", "--nnodes", "2"]  # fmt: skip
    env = {**os.environ, "MASTER_ADDR": host, "MASTER_PORT": port, "NODE_RANK": "1"}
    worker = subprocess.Popen(command, env=env)
    try:
        addr = f"tcp://{host}:{port}"
        llm = LLM(tiny, block_size=4, tensor_parallel_size=2, nnodes=2, dist_init_addr=addr)
        assert_same_or_near_tie(generate(llm, prompts, params), reference)
        assert worker.wait(30) == 0  # the engine's shutdown ended it
    finally:
        if worker.poll() is None:
            worker.kill()


def test_a_rank_that_dies_fails_the_next_step_with_a_clear_error(tiny):
    llm = LLM(tiny, block_size=4, tensor_parallel_size=2)
    try:
        [rank] = llm.engine.executor.procs
        os.kill(rank.process.pid, signal.SIGKILL)
        rank.process.wait()
        with pytest.raises(WorkerFailed, match=r"tensor-parallel rank 1 \(pid \d+\) exited with code -9"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
    finally:
        llm.engine.shutdown()


def test_a_rank_that_exits_just_after_a_failed_collective_is_still_named():
    """A killed rank's closed socket can fail the driver's collective before the rank is reapable."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    try:
        assert exited_ranks([Rank(1, proc)], grace_s=0) == []
        assert exited_ranks([Rank(1, proc)], grace_s=30) == [
            f"tensor-parallel rank 1 (pid {proc.pid}) exited with code 0"
        ]
    finally:
        proc.kill()
        proc.wait()


def test_several_hosts_need_an_address_to_meet_at(monkeypatch):
    from pagetron.backend import EngineConfig

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError) as e:
        EngineConfig(tensor_parallel_size=4, nnodes=2)
    assert e.value.key == "dist_init_addr"
    with pytest.raises(ConfigError) as e:
        EngineConfig(tensor_parallel_size=3, nnodes=2, dist_init_addr="h0:29500")
    assert e.value.key == "nnodes"
    assert EngineConfig(
        tensor_parallel_size=4, nnodes=2, dist_init_addr="tcp://h0:29500"
    ).rendezvous_address() == ("h0:29500")
    monkeypatch.setenv("MASTER_ADDR", "h1")
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert EngineConfig(tensor_parallel_size=4, nnodes=2).rendezvous_address() == "h1:29501"


def test_a_rank_that_dies_while_idle_makes_the_serving_engine_unhealthy(tiny):
    """No step runs to notice it, so the serving watchdog polls the executor's health."""
    import time

    from pagetron.backend import EngineConfig
    from pagetron.backend.engine.llm_engine import LLMEngine
    from pagetron.backend.serving.async_engine import AsyncEngine

    reasons: list[str] = []
    engine = LLMEngine(EngineConfig(model=tiny, block_size=4, tensor_parallel_size=2))
    serving = AsyncEngine(engine, on_unhealthy=reasons.append)
    serving.start()
    try:
        [rank] = engine.executor.procs
        os.kill(rank.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not reasons and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reasons == [f"tensor-parallel rank 1 (pid {rank.process.pid}) exited with code -9"]
    finally:
        serving.shutdown()
        engine.shutdown()
