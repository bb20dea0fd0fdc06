"""When sending responses falls behind the engine, each request's queued deltas go out as one response:
nothing is lost, reordered or sent after a request's final response or error."""

from model_factory import make_hf_model
from pagetron.backend import LLM, SamplingParams
from pagetron.backend.core.config import EngineConfig
from pagetron.backend.engine.llm_engine import LLMEngine
from pagetron.backend.engine.outputs import CompletionOutput, RequestOutput
from pagetron.backend.serving.async_engine import AsyncEngine, LiveRequest, coalesce
from pagetron.backend.serving.request_parser import ParsedRequest
from sinks import RecordingSink


def delta(request_id: str, token_ids: list[int], text: str, finish_reason: str | None = None):
    out = CompletionOutput(
        index=0,
        text=text,
        token_ids=list(token_ids),
        cumulative_logprob=None,
        logprobs=None,
        finish_reason=finish_reason,
        delta_text=text,
        delta_token_ids=list(token_ids),
    )
    return RequestOutput(request_id, None, [1, 2], [out], finished=finish_reason is not None)


def live(request_id: str) -> LiveRequest:
    return LiveRequest(request_id, ParsedRequest(prompt=[1, 2], params=SamplingParams()), sink=None)


def test_coalesce_joins_each_requests_deltas_in_order_and_stops_at_its_end():
    a, b, c = live("a"), live("b"), live("c")
    items = [
        (a, delta("a", [5], "x")),
        (b, delta("b", [7], "p")),
        (a, delta("a", [6], "y")),
        (c, delta("c", [9], "u")),
        (c, ("the request was cancelled", "CANCELLED")),
        (c, delta("c", [10], "v")),  # after its error: never sent
        (b, delta("b", [8], "q", finish_reason="length")),
        (a, delta("a", [4], "z")),
    ]
    merged = coalesce(items)
    assert [(r.request_id, type(p).__name__) for r, p in merged] == [
        ("a", "RequestOutput"),
        ("b", "RequestOutput"),
        ("c", "RequestOutput"),
        ("c", "tuple"),
    ]
    first_a, first_b, first_c = merged[0][1], merged[1][1], merged[2][1]
    assert first_a.outputs[0].token_ids == [5, 6, 4] and first_a.outputs[0].text == "xyz"
    assert first_a.outputs[0].delta_token_ids == [5, 6, 4] and not first_a.finished
    assert first_b.outputs[0].token_ids == [7, 8] and first_b.finished
    assert first_b.outputs[0].finish_reason == "length"
    assert first_c.outputs[0].token_ids == [9]
    assert merged[3][1] == ("the request was cancelled", "CANCELLED")


def test_a_request_after_its_final_output_is_not_merged_into():
    a = live("a")
    merged = coalesce([(a, delta("a", [1], "x", finish_reason="stop")), (a, delta("a", [2], "y"))])
    assert len(merged) == 1 and merged[0][1].outputs[0].token_ids == [1]


def test_slow_sends_coalesce_without_losing_tokens(tmp_path):
    folder = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False)
    args = {"model": str(folder), "kv_cache_memory_gb": 0.01, "max_num_seqs": 8}
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    expected = [o.outputs[0].token_ids for o in LLM(**args).generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )]  # fmt: skip

    engine = AsyncEngine(LLMEngine(EngineConfig(**args)))
    engine.start()
    sinks = [RecordingSink(send_s=0.03) for _ in prompts]  # far slower than a tiny model's step
    try:
        for i, (prompt, sink) in enumerate(zip(prompts, sinks)):
            engine.submit(f"r{i}", ParsedRequest(prompt=prompt, params=params, stream=True), sink)
        for sink in sinks:
            sink.wait(30)
    finally:
        engine.shutdown()
    for sink, tokens in zip(sinks, expected):
        assert sink.error is None and sink.tokens == tokens
        assert sink.finals == 1 and sink.responses[-1].outputs[0].finish_reason == "length"
        # 40 tokens at 30 ms per send: the engine finishes long before one response per token could go
        assert len(sink.responses) < 20
