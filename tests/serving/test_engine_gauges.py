"""The running/waiting/KV gauges a serving engine publishes are right after a cancellation too, when no
engine step follows it (found through the OpenAI frontend: an idle server kept reporting the cancelled
request as running)."""

import threading
import time

from model_factory import make_hf_model
from pagetron.backend import SamplingParams
from pagetron.backend.core.config import EngineConfig
from pagetron.backend.engine.llm_engine import LLMEngine
from pagetron.backend.engine.outputs import RequestOutput
from pagetron.backend.serving.async_engine import AsyncEngine
from pagetron.backend.serving.request_parser import ParsedRequest
from pagetron.backend.serving.step_stats import StepStats


class CancellableSink:
    def __init__(self, cancel_after_tokens: bool = True):
        self.cancel_after_tokens = cancel_after_tokens
        self.cancelled = threading.Event()
        self.tokens = 0
        self.error: tuple[str, str] | None = None
        self.done = threading.Event()

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def send(self, output: RequestOutput, final: bool) -> None:
        self.tokens += len(output.outputs[0].token_ids)
        if self.tokens >= 3 and self.cancel_after_tokens:
            self.cancelled.set()  # the client leaves after its first tokens
        if final:
            self.done.set()

    def send_error(self, message: str, code: str) -> None:
        self.error = (message, code)
        self.done.set()


def test_gauges_drop_to_zero_when_the_only_request_is_cancelled(tmp_path):
    folder = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False)
    published: list[StepStats] = []
    engine = AsyncEngine(
        LLMEngine(EngineConfig(model=str(folder), kv_cache_memory_gb=0.01)), on_step=published.append
    )
    engine.start()
    sink = CancellableSink()
    try:
        params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
        engine.submit("r0", ParsedRequest(prompt=[3, 4, 5], params=params, stream=True), sink)
        assert sink.done.wait(30) and sink.error[1] == "CANCELLED", sink.error
        assert 3 <= sink.tokens < 500
        assert any(s.num_running == 1 and s.kv_cache_usage > 0 for s in published)
        deadline = time.monotonic() + 5
        while published[-1].num_running != 0:
            assert time.monotonic() < deadline, published[-1]
            time.sleep(0.01)
        assert published[-1].kv_cache_usage == 0 and published[-1].num_waiting == 0
    finally:
        engine.shutdown()


def test_an_input_the_tokenizer_chokes_on_fails_only_its_request(tmp_path):
    folder = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False)
    llm_engine = LLMEngine(EngineConfig(model=str(folder), kv_cache_memory_gb=0.01))
    real_add = llm_engine.add_request

    def add_request(prompt, *args, **kwargs):
        if prompt == [7, 7, 7]:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")  # as tokenizers says
        return real_add(prompt, *args, **kwargs)

    llm_engine.add_request = add_request
    engine = AsyncEngine(llm_engine)
    engine.start()
    bad, good = CancellableSink(), CancellableSink(cancel_after_tokens=False)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        engine.submit("bad", ParsedRequest(prompt=[7, 7, 7], params=params, stream=True), bad)
        assert bad.done.wait(10)
        message, code = bad.error
        assert code == "INVALID_ARG" and message.startswith("the prompt could not be tokenized: TypeError")
        engine.submit("good", ParsedRequest(prompt=[3, 4, 5], params=params, stream=True), good)
        assert good.done.wait(30) and good.error is None and good.tokens == 4 and engine.healthy
    finally:
        engine.shutdown()
