"""Greedy outputs are token-identical to HF transformers generate() on the same weights.

The engine runs all prompts as one batch (sequences join and leave mid-run: max_num_seqs is smaller
than the number of prompts and max_tokens differ), and must give the same tokens with prefix caching
on and off, with a KV pool so small that preemption happens, and with chunked prefill forced. SmolLM2's
HF outputs are recorded in tests/data (checked against a fresh HF run under make test-full); the tiny
models' are computed by HF in each run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from model_factory import FULL_ONLY, make_hf_model
from pagetron.backend import LLM, SamplingParams
from pagetron.backend.benchmarks.hf_reference import hf_greedy, load_hf_model

SYSTEM = (
    "You are Pagetron's test assistant. Answer briefly, politely and precisely, and never invent facts "
    "you do not know. Prefer plain words over jargon."
)
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child.",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "Why do cats purr?",
]
RAW = [
    "Once upon a time, there was a little girl named",
    "The quick brown fox",
    "def fibonacci(n):\n",
    "1, 2, 3, 4, 5,",
    "In 1969, the first humans",
    "Hi",
    "The following is a list of the largest cities in Europe by population: London, Paris, Madrid, Berlin,"
    " Rome, Bucharest, Vienna, Hamburg, Warsaw, Budapest, Barcelona, Munich, Milan, Prague, Sofia and",
    "Le chat est",
]


@pytest.fixture(scope="module")
def smollm_prompts(smollm):
    prompts = [
        smollm.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        for q in QUESTIONS[:4]
    ]
    prompts += [smollm.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS[4:]]
    prompts += [smollm.tokenizer(p).input_ids for p in RAW]
    assert len(prompts) == 16 and len({len(p) for p in prompts}) >= 12
    return prompts


@pytest.fixture(scope="module")
def max_tokens(smollm_prompts):
    return [
        24 - 2 * (i % 5) for i in range(len(smollm_prompts))
    ]  # 16..24: sequences leave at different steps


# HF transformers' greedy continuations of these prompts, recorded once (the run takes HF ~20 s on the
# CPU); test_the_recorded_outputs_are_hf_transformers_own checks them against HF under make test-full.
GOLDEN = Path(__file__).parent / "data" / "smollm2_hf_greedy.json"


@pytest.fixture(scope="module")
def hf_outputs(smollm_prompts, max_tokens):
    golden = json.loads(GOLDEN.read_text())
    assert (golden["prompts"], golden["max_tokens"]) == (smollm_prompts, max_tokens), f"{GOLDEN} is stale"
    return golden["outputs"]


@FULL_ONLY
def test_the_recorded_outputs_are_hf_transformers_own(hf_smollm, smollm_prompts, max_tokens, hf_outputs):
    assert [hf_greedy(hf_smollm, p, m) for p, m in zip(smollm_prompts, max_tokens)] == hf_outputs


def engine_outputs(llm, prompts, max_tokens):
    params = [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], outs


def test_smollm2_default_engine_matches_hf(smollm, smollm_prompts, max_tokens, hf_outputs):
    ours, outs = engine_outputs(smollm, smollm_prompts, max_tokens)
    assert ours == hf_outputs
    assert outs[0].outputs[0].text == smollm.tokenizer.decode(hf_outputs[0], skip_special_tokens=True)
    # prefix caching is on: the shared system prompt is served from the cache for the later requests
    assert sum(o.num_cached_tokens for o in outs[:4]) >= 3 * 32  # two 16-token blocks each, at least


@pytest.mark.parametrize(
    "engine_args, check",
    [
        pytest.param({"enable_prefix_caching": False, "max_num_seqs": 5}, "no_cache_hits", marks=FULL_ONLY),
        ({"num_kv_blocks": 24, "max_num_seqs": 16, "reserve_kv_for_growth": False}, "preemption"),
        ({"max_num_batched_tokens": 32, "max_num_seqs": 16}, "chunked"),
    ],
    ids=["prefix-cache-off", "preemption", "chunked-prefill"],
)
def test_smollm2_variants_match_hf(engine_args, check, smollm_prompts, max_tokens, hf_outputs):
    llm = LLM(kv_cache_memory_gb=0.25, **engine_args)
    ours, outs = engine_outputs(llm, smollm_prompts, max_tokens)
    assert ours == hf_outputs
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if check == "no_cache_hits":
        assert engine.block_manager.prefix_cache_hits == 0
    if check == "preemption":
        assert engine.scheduler.num_preemptions > 0
    if check == "chunked":
        longest = max(len(p) for p in smollm_prompts)
        assert longest > 32  # so at least one prompt needed several steps


TINY = [
    ("llama", 2, False),
    ("llama", 4, True),
    ("mistral", 1, False),
    ("qwen2", 2, False),
    ("qwen2", 4, True),
    ("qwen3", 2, True),
]


@pytest.mark.parametrize(
    "arch, num_kv_heads, tied", TINY, ids=[f"{a}-kv{k}-{'tied' if t else 'untied'}" for a, k, t in TINY]
)
def test_tiny_random_models_match_hf(tmp_path, arch, num_kv_heads, tied):
    folder = make_hf_model(tmp_path, arch, num_kv_heads=num_kv_heads, tie_word_embeddings=tied, seed=3)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 40))] for _ in range(12)]
    max_tokens = [rng.randint(4, 16) for _ in prompts]
    hf = load_hf_model(str(folder))
    expected = [hf_greedy(hf, p, m) for p, m in zip(prompts, max_tokens)]
    for args in (
        {"block_size": 4, "max_num_seqs": 5},
        {"block_size": 4, "num_kv_blocks": 14, "max_num_batched_tokens": 8, "max_num_seqs": 8},
    ):
        llm = LLM(str(folder), **args)
        ours, _ = engine_outputs(llm, prompts, max_tokens)
        assert ours == expected, args
