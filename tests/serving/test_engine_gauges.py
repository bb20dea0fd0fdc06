"""The running/waiting/KV gauges a serving engine publishes are right after a cancellation too, when no
engine step follows it (found through the OpenAI frontend: an idle server kept reporting the cancelled
request as running)."""

import threading
import time

from model_factory import make_hf_model
from pagetron.backend import SamplingParams
from pagetron.backend.config import EngineConfig
from pagetron.backend.llm_engine import LLMEngine
from pagetron.backend.outputs import RequestOutput
from pagetron.backend.serving.async_engine import AsyncEngine
from pagetron.backend.serving.request_parser import ParsedRequest
from pagetron.backend.serving.step_stats import StepStats


class CancellableSink:
    def __init__(self):
        self.cancelled = threading.Event()
        self.tokens = 0
        self.error: tuple[str, str] | None = None
        self.done = threading.Event()

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def send(self, output: RequestOutput, final: bool) -> None:
        self.tokens += len(output.outputs[0].token_ids)
        if self.tokens >= 3:
            self.cancelled.set()  # the client leaves after its first tokens

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
