"""The running/waiting/KV gauges a serving engine publishes are right after a cancellation too, when no
engine step follows it (found through the OpenAI frontend: an idle server kept reporting the cancelled
request as running)."""

import time

from model_factory import make_hf_model
from pagetron.backend import SamplingParams
from pagetron.backend.core.config import EngineConfig
from pagetron.backend.engine.llm_engine import LLMEngine
from pagetron.backend.engine.outputs import RequestOutput
from pagetron.backend.serving.async_engine import AsyncEngine
from pagetron.backend.serving.request_parser import ParsedRequest
from pagetron.backend.serving.step_stats import StepStats
from sinks import RecordingSink


def cancel_after_three_tokens(sink: RecordingSink, output: RequestOutput) -> None:
    if len(sink.tokens) >= 3:
        sink.cancelled.set()  # the client leaves after its first tokens


def test_gauges_drop_to_zero_when_the_only_request_is_cancelled(tmp_path):
    folder = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False)
    published: list[StepStats] = []
    engine = AsyncEngine(
        LLMEngine(EngineConfig(model=str(folder), kv_cache_memory_gb=0.01)), on_step=published.append
    )
    engine.start()
    sink = RecordingSink(on_send=cancel_after_three_tokens)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
        engine.submit("r0", ParsedRequest(prompt=[3, 4, 5], params=params, stream=True), sink)
        assert sink.wait(30).error[1] == "CANCELLED", sink.error
        assert 3 <= len(sink.tokens) < 500
        assert any(s.num_running == 1 and s.kv_cache_usage > 0 for s in published)
        deadline = time.monotonic() + 5
        while published[-1].num_running != 0:
            assert time.monotonic() < deadline, published[-1]
            time.sleep(0.01)
        assert published[-1].kv_cache_usage == 0 and published[-1].num_waiting == 0
    finally:
        engine.shutdown()


def test_an_input_the_tokenizer_chokes_on_fails_only_its_request(tmp_path):
    folder = make_hf_model(
        tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False, vocab_size=49152, with_tokenizer=True
    )
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(folder), kv_cache_memory_gb=0.01)))
    engine.start()
    bad, good = RecordingSink(), RecordingSink()
    try:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        # a lone surrogate: the real tokenizer raises TypeError (the request parser refuses such bytes,
        # but the engine thread must survive whatever reaches it)
        engine.submit("bad", ParsedRequest(prompt="a\udfffb", params=params, stream=True), bad)
        message, code = bad.wait(10).error
        assert code == "INVALID_ARG" and message.startswith("the prompt could not be tokenized: TypeError")
        engine.submit("good", ParsedRequest(prompt=[3, 4, 5], params=params, stream=True), good)
        assert good.wait(30).error is None and len(good.tokens) == 4 and engine.healthy
    finally:
        engine.shutdown()
