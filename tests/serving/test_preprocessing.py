"""Preparing a request (chat template, tokenizer) runs beside the engine thread, never on it: a large
prompt being tokenized does not stop the streams that are running, and a prompt whose byte length alone
proves it cannot fit max_model_len is refused without being tokenized."""

from __future__ import annotations

import pytest

from pagetron.backend import SamplingParams
from pagetron.backend.core.config import EngineConfig
from pagetron.backend.engine.llm_engine import LLMEngine
from pagetron.backend.serving.async_engine import AsyncEngine
from pagetron.backend.serving.request_parser import ParsedRequest
from sinks import RecordingSink

STREAM = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The tiny model (4,096 positions) behind an AsyncEngine."""
    async_engine = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_model_dir), kv_cache_memory_gb=0.05)))
    async_engine.start()
    yield async_engine
    async_engine.shutdown()


def test_a_prompt_too_long_by_its_bytes_is_refused_without_tokenizing(engine):
    limit = 2 * (engine.engine.max_model_len - 1) * engine.engine.max_token_bytes
    big = RecordingSink()
    engine.submit("big", ParsedRequest(prompt="a" * (limit + 1), params=STREAM), big)
    message, code = big.wait(30).error
    assert code == "INVALID_ARG"
    assert message == (
        f"prompt: {limit + 1} bytes of text cannot fit max_model_len 4096: no token of this model is "
        f"longer than {engine.engine.max_token_bytes} bytes (refused without tokenizing)"
    )
    chat = RecordingSink()
    messages = [{"role": "user", "content": "hi"}] * 4096
    engine.submit("chat", ParsedRequest(prompt={"messages": messages}, params=STREAM), chat)
    assert chat.wait(30).error == ("messages: 4096 messages cannot fit max_model_len 4096", "INVALID_ARG")


def test_a_large_prompt_being_tokenized_does_not_stop_running_streams(engine):
    running = RecordingSink()
    engine.submit("running", ParsedRequest(prompt=[5, 6, 7], params=STREAM, stream=True), running)
    while len(running.tokens) < 5:  # it is generating
        running.done.wait(0.01)
    # just under the byte bound: tokenized in full (a few tenths of a second), then refused by its count
    limit = 2 * (engine.engine.max_model_len - 1) * engine.engine.max_token_bytes
    large = RecordingSink()
    tokens_before = len(running.tokens)
    engine.submit("large", ParsedRequest(prompt="a" * limit, params=STREAM), large)
    message, code = large.wait(60).error
    tokens_during = len(running.tokens) - tokens_before
    assert code == "INVALID_ARG" and message.startswith("prompt: the prompt has ")
    assert "tokens but max_model_len is 4096" in message  # it was tokenized
    # the engine thread went on stepping while the large prompt was tokenized beside it (on the engine
    # thread, as before, no token would have come out meanwhile)
    assert tokens_during >= 10, tokens_during
    engine.abort("running")
    assert running.wait(30).error[1] == "CANCELLED" and engine.healthy
