"""Engine-level behaviour on a tiny random model: n > 1 block sharing, dummy weights, KV accounting."""

from __future__ import annotations

import pytest

from model_factory import make_hf_model
from pagetron.backend import LLM, SamplingParams


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
    seqs = [st.seq for st in engine.output_processor.requests[request_id].seqs]
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
