"""Shared fixtures: the bundled SmolLM2 model (engine and HF reference), loaded once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small KV pools keep many engines in one test process cheap; tests that need more say so.
TEST_ENGINE_ARGS = {"kv_cache_memory_gb": 0.25}


@pytest.fixture(scope="session")
def smollm():
    from pagetron.backend import LLM

    return LLM(**TEST_ENGINE_ARGS)


@pytest.fixture(scope="session")
def hf_smollm():
    from pagetron.backend.benchmarks.hf_reference import load_hf_model

    return load_hf_model(None)
