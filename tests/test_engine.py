"""Engine-level behaviour on a tiny random model: n > 1 block sharing, dummy weights, KV accounting."""

from __future__ import annotations

import json

import pytest

from model_factory import make_hf_model
from pagetron.backend import LLM, ConfigError, EngineConfig, InvalidRequestError, SamplingParams
from pagetron.backend.executor.executor import ExecutorWrapper, UniprocExecutor


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return str(
        make_hf_model(tmp_path_factory.mktemp("tiny"), "llama", num_kv_heads=2, tie_word_embeddings=False)
    )


def test_n_copies_share_the_prompts_full_blocks(tiny_llama):
    llm = LLM(tiny_llama, block_size=4, num_kv_blocks=32)
    engine = llm.engine
    prompt = list(range(10, 20))  # 10 tokens: two full blocks and a partial one
    request_id = engine.add_request(prompt, SamplingParams(n=3, temperature=0.0, max_tokens=4))
    engine.step()
    seqs = engine.output_processor.requests[request_id].seqs
    tables = [s.block_table for s in seqs]
    # copy 0 computes the prompt; copies 1 and 2 take its two full blocks from the prefix cache
    # (written earlier in the same forward pass) and compute only their own last, partial block
    assert tables == [[0, 1, 2], [0, 1, 3], [0, 1, 4]]
    assert [s.num_cached_tokens for s in seqs] == [0, 8, 8]
    assert [engine.block_manager.ref_counts[b] for b in (0, 1, 2, 3, 4)] == [3, 3, 1, 1, 1]
    while engine.has_unfinished_requests():
        engine.step()
    assert [s.output_token_ids for s in seqs][1:] == [seqs[0].output_token_ids] * 2
    assert engine.block_manager.num_free_blocks == 32


def test_dummy_weights_run_from_a_config_alone(tiny_llama, tmp_path):
    config_only = tmp_path / "cfg"
    config_only.mkdir()
    (config_only / "config.json").write_text(open(f"{tiny_llama}/config.json").read())
    llm = LLM(str(config_only), load_format="dummy", num_kv_blocks=16)
    [out] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].text == ""  # no tokenizer: ids only
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text needs a tokenizer", use_tqdm=False)


def test_max_tokens_none_runs_to_max_model_len(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=24, num_kv_blocks=16, block_size=4)
    [out] = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 20 and out.outputs[0].finish_reason == "length"


def test_max_model_len_above_the_model_limit_is_a_config_error(tiny_llama):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny_llama, max_model_len=100_000)


class StepsExecutor(ExecutorWrapper):
    """The default executor, failing with ``error`` from its ``fail_at``-th step on."""

    def __init__(self, inner, error: BaseException | None = None, fail_at: int = 1):
        super().__init__(inner)
        self.error, self.fail_at, self.steps = error, fail_at, 0

    def execute(self, scheduler_output):
        self.steps += 1
        if self.error is not None and self.steps >= self.fail_at:
            raise self.error
        return super().execute(scheduler_output)


def steps_executor(**kwargs):
    return lambda spec: StepsExecutor(UniprocExecutor(spec), **kwargs)


def test_one_eos_set_for_min_tokens_and_stopping(tmp_path):
    # config EOS 0, tokenizer EOS 2 (<|im_end|>), generation_config adds 5: all three stop and all are masked
    folder = make_hf_model(
        tmp_path,
        "llama",
        num_kv_heads=2,
        tie_word_embeddings=False,
        vocab_size=49152,
        with_tokenizer=True,
        eos_token_id=0,
    )
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    llm = LLM(str(folder), block_size=4, num_kv_blocks=64)
    assert llm.engine.eos_token_ids == {0, 2, 5}
    for eos in (2, 5):
        # the model prefers eos, then 7, whatever it computes: EOS is masked below min_tokens, then stops
        params = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=3, logit_bias={eos: 100, 7: 50})
        [out] = llm.generate([[9, 10, 11]], params, use_tqdm=False)
        assert out.outputs[0].token_ids == [7, 7, 7, eos] and out.outputs[0].finish_reason == "stop"


def test_generate_ignores_other_requests_and_cleans_up_when_interrupted(tiny_llama):
    llm = LLM(tiny_llama, block_size=4, num_kv_blocks=64, executor_factory=steps_executor())
    other = llm.engine.add_request([1, 2, 3], SamplingParams(max_tokens=1, ignore_eos=True))
    [out] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 5
    assert other not in llm.engine.output_processor.requests  # it finished on the way
    executor = llm.engine.executor
    executor.error, executor.fail_at = KeyboardInterrupt(), executor.steps + 4
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == 64


def test_failed_forward_pass_aborts_in_flight_work_and_forgets_the_prefix_cache(tiny_llama):
    prompt, params = list(range(10, 23)), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm = LLM(tiny_llama, block_size=4, num_kv_blocks=64)
    [expected] = llm.generate([prompt], params, use_tqdm=False)
    llm = LLM(
        tiny_llama,
        block_size=4,
        num_kv_blocks=64,
        executor_factory=steps_executor(error=RuntimeError("device lost")),
    )
    engine = llm.engine
    request_id = engine.add_request(prompt, params)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert not engine.has_unfinished_requests() and engine.block_manager.cached_blocks == {}
    assert engine.abort_request(request_id) is None  # already aborted, with the rest
    engine.executor.error = None
    [again] = llm.generate([prompt], params, use_tqdm=False)
    assert again.outputs[0].token_ids == expected.outputs[0].token_ids and again.num_cached_tokens == 0


def test_request_validation_names_the_field(tiny_llama):
    llm = LLM(tiny_llama, block_size=4, num_kv_blocks=64, max_model_len=32)
    cases = [
        ([1, 2, 3], SamplingParams(max_tokens=30), "max_tokens"),  # 3 + 30 > 32: never clipped silently
        ([1, 2, 3], SamplingParams(stop=["x"]), "stop"),  # no tokenizer to match stop strings with
        ([1, True], SamplingParams(), "prompt_token_ids"),
        ({"prompt_token_ids": [1], "images": []}, SamplingParams(), "prompt"),
        (None, SamplingParams(), "prompt"),
    ]
    for prompt, params, field in cases:
        with pytest.raises(InvalidRequestError) as e:
            llm.generate([prompt], params, use_tqdm=False)
        assert e.value.field == field, (prompt, params)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(None, use_tqdm=False)
    assert e.value.field == "prompts"
    [out] = llm.generate(
        {"prompt": "kept", "prompt_token_ids": [4, 5]}, SamplingParams(max_tokens=2), use_tqdm=False
    )
    assert (out.prompt, out.prompt_token_ids) == ("kept", [4, 5])


@pytest.mark.parametrize(
    "args, key",
    [
        ({"max_num_batched_tokens": 4, "max_num_seqs": 8}, "max_num_batched_tokens"),
        ({"kv_cache_memory_gb": float("inf")}, "kv_cache_memory_gb"),
        ({"kv_cache_memory_gb": float("nan")}, "kv_cache_memory_gb"),
        ({"block_size": 12}, "block_size"),
        ({"enable_prefix_caching": "yes"}, "enable_prefix_caching"),
        ({"max_model_len": 0}, "max_model_len"),
    ],
)
def test_bad_engine_arguments_name_the_key(args, key):
    with pytest.raises(ConfigError) as e:
        EngineConfig(**args)
    assert e.value.key == key


def test_an_engine_is_freed_by_reference_counts_and_unfreezes_the_heap_on_shutdown(tiny_llama):
    """The engine freezes the GC heap once built (llm_engine.freeze_gc_heap), which is only safe if a
    dropped engine needs no cyclic collection: nothing of it may sit in a reference cycle."""
    import gc
    import weakref

    llm = LLM(tiny_llama, block_size=4, num_kv_blocks=32)
    assert gc.get_freeze_count() > 0
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    worker = llm.engine.executor.worker
    refs = [weakref.ref(o) for o in (llm.engine, llm.engine.scheduler, worker, worker.model, worker.runner)]
    gc.disable()
    try:
        del llm, worker
        assert [r() is None for r in refs] == [True] * len(refs)
    finally:
        gc.enable()
    LLM(tiny_llama, block_size=4, num_kv_blocks=32).engine.shutdown()
    assert gc.get_freeze_count() == 0
