"""Asynchronous scheduling (engine argument async_scheduling): step N+1 is scheduled and launched before
step N's result is applied, its pending tokens taken from step N's samples on the device. Outputs equal
synchronous stepping on every workload below (prefix caching, chunked prefill, preemption, seeds,
penalties, min_tokens, stop tokens and strings, logprobs, n > 1, aborts); the pipeline itself is pinned
step by step.
"""

from __future__ import annotations

import pytest

from model_factory import make_hf_model
from pagetron.backend import LLM, SamplingParams
from pagetron.backend.executor.executor import UniprocExecutor

LOGPROB_TOLERANCE = 1e-5  # batches differ between the modes (rows that ran ahead), so float sums may too


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (stop strings need text)."""
    folder = make_hf_model(tmp_path_factory.mktemp("async"), "llama", num_kv_heads=2,
                           tie_word_embeddings=False, vocab_size=49152, with_tokenizer=True)  # fmt: skip
    return str(folder)


class RecordingExecutor(UniprocExecutor):
    """The default executor, noting for each launched step which input rows were still pending."""

    def __init__(self, spec):
        super().__init__(spec)
        self.pending_rows: list[list[int]] = []  # per launch: seq ids whose input token was pending
        self.ran_ahead_with_penalties = False
        inputs = self.worker.runner.inputs
        build = inputs.build

        def recording_build(out):
            host = build(out)
            seqs = {seq.seq_id: seq for seq in out.seqs}
            self.pending_rows.append([seq_id for _, seq_id in host.pending])
            self.ran_ahead_with_penalties |= any(
                seqs[seq_id].sampling_params.uses_output_history for _, seq_id in host.pending
            )
            return host

        inputs.build = recording_build


def run(llm: LLM, prompts, params) -> list:
    return [o.outputs for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_same(ours, reference) -> None:
    for i, (a_outputs, b_outputs) in enumerate(zip(ours, reference, strict=True)):
        for a, b in zip(a_outputs, b_outputs, strict=True):
            assert (a.token_ids, a.text, a.finish_reason, a.stop_reason) == (
                b.token_ids, b.text, b.finish_reason, b.stop_reason
            ), i  # fmt: skip
            assert abs(a.cumulative_logprob - b.cumulative_logprob) < LOGPROB_TOLERANCE * len(a.token_ids)
            for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
                assert x.keys() == y.keys() and all(
                    abs(x[t].logprob - y[t].logprob) < LOGPROB_TOLERANCE for t in x
                )


def workload(llm: LLM):
    """Prompts and sampling parameters exercising every rule of running ahead, including early stops
    on a token the reference run is known to produce."""
    import random

    rng = random.Random(3)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(2, 40))] for _ in range(10)]
    prompts.append(prompts[0] + [5, 6, 7, 8, 9])  # a prefix-cache hit on the first
    greedy = SamplingParams(temperature=0, max_tokens=12)
    [probe] = run(llm, [{"prompt_token_ids": prompts[1]}], greedy)
    third = probe[0].token_ids[2]
    params = [
        greedy,
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[third]),  # stops after 3 tokens
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=11, max_tokens=16, logprobs=2),
        SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=9),
        SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, max_tokens=10),
        SamplingParams(temperature=0.7, seed=2, min_tokens=6, max_tokens=8, stop_token_ids=list(range(100))),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0, max_tokens=20, stop=["e"], logprobs=1),  # a stop string, early
        SamplingParams(temperature=0.9, seed=8, frequency_penalty=0.4, max_tokens=7),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        greedy,
    ]
    return [{"prompt_token_ids": p} for p in prompts], params


CONFIGS = {
    "prefix-cache": {"block_size": 4, "max_num_seqs": 6},
    "chunked-prefill": {"block_size": 4, "max_num_batched_tokens": 8, "max_num_seqs": 8},
    "preemption": {"block_size": 4, "num_kv_blocks": 20, "reserve_kv_for_growth": False},
}


@pytest.mark.parametrize("args", CONFIGS.values(), ids=CONFIGS.keys())
def test_asynchronous_outputs_equal_synchronous(tiny, args):
    sync = LLM(tiny, **args)
    prompts, params = workload(sync)
    reference = run(sync, prompts, params)
    llm = LLM(tiny, async_scheduling=True, executor_factory=RecordingExecutor, **args)
    assert llm.engine.async_scheduling
    assert_same(run(llm, prompts, params), reference)
    assert reference[1][0].finish_reason == "stop" and len(reference[1][0].token_ids) == 3
    assert reference[7][0].finish_reason == "stop" and reference[7][0].stop_reason == "e"
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert any(engine.executor.pending_rows), "no step ever took a pending token"
    # sequences whose sampling reads their output history (penalties) never run ahead
    assert not engine.executor.ran_ahead_with_penalties
    if "num_kv_blocks" in args:
        assert engine.scheduler.num_preemptions > 0


def test_the_pipeline_step_by_step(tiny):
    """One request, 4 prompt tokens, 3 greedy output tokens, blocks of 4:

    step() call   schedules                     launches with     returns
    1             prefill [t0 t1 t2 t3]         -                 nothing (step 1 in flight)
    2             decode of out0 (pending)      out0 from step 1  out0
    3             decode of out1 (pending)      out1 from step 2  out0 out1
    4             nothing: out2 ends it         -                 out0 out1 out2, finished (length)
    """
    llm = LLM(tiny, block_size=4, num_kv_blocks=8, async_scheduling=True, executor_factory=RecordingExecutor)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3)
    [reference] = [o.outputs[0] for o in LLM(tiny, block_size=4).generate([[11, 12, 13, 14]], params)]
    request_id = engine.add_request([11, 12, 13, 14], params)
    [seq] = engine.output_processor.requests[request_id].seqs
    returned, tables, pending = [], [], []
    for _ in range(4):
        outputs = engine.step()
        returned.append([(o.outputs[0].token_ids, o.finished) for o in outputs])
        tables.append(list(seq.block_table))
        pending.append(seq.num_pending_tokens)
    ids = reference.token_ids
    assert returned == [[], [(ids[:1], False)], [(ids[:2], False)], [(ids, True)]]
    assert engine.executor.pending_rows == [[], [seq.seq_id], [seq.seq_id]]
    assert tables == [[0], [0, 1], [0, 1], []]  # out0 goes to position 4: block 1; the end frees both
    assert pending == [1, 1, 1, 0]  # one token in flight after each launch, none at the end
    assert not engine.has_unfinished_requests()


def test_an_abort_while_a_step_runs_spares_the_others(tiny):
    params = SamplingParams(temperature=0, max_tokens=10)
    prompts = [[21, 22, 23], [31, 32, 33, 34, 35]]
    reference = run(LLM(tiny, block_size=4), prompts, params)
    llm = LLM(tiny, block_size=4, async_scheduling=True)
    engine = llm.engine
    first, second = (engine.add_request(p, params) for p in prompts)
    for _ in range(3):
        engine.step()
    aborted = engine.abort_request(first)
    assert aborted is not None and aborted.outputs[0].finish_reason == "abort"
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id == second
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    assert finished == {second: reference[1][0].token_ids}
    engine.step()  # the last step launched (it ran rows ahead) is applied: nothing more comes out
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_tensor_parallel_and_wrapped_executors_step_synchronously(tiny):
    from pagetron.backend.executor.executor import ExecutorWrapper

    llm = LLM(
        tiny, async_scheduling=True, executor_factory=lambda spec: ExecutorWrapper(UniprocExecutor(spec))
    )
    assert not llm.engine.async_scheduling
    [out] = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4


class DeviceApartExecutor(UniprocExecutor):
    """The default executor, as if its device ran apart from the host (as a GPU does)."""

    def __init__(self, spec):
        super().__init__(spec)
        self.overlaps_host = True


def test_on_by_default_only_where_it_overlaps_something(tiny):
    """The default (None) schedules ahead where the device runs apart from the host; on the CPU the forward
    pass runs on the host, so the engine steps synchronously; an explicit False always wins."""
    assert not LLM(tiny, num_kv_blocks=8).engine.async_scheduling
    assert LLM(tiny, num_kv_blocks=8, executor_factory=DeviceApartExecutor).engine.async_scheduling
    off = LLM(tiny, num_kv_blocks=8, executor_factory=DeviceApartExecutor, async_scheduling=False)
    assert not off.engine.async_scheduling
