"""Over gRPC (no body limit in tritonserver 2.51: a message may be up to 2 GB), an oversize prompt is
refused by its byte length before it is tokenized, while the streams beside it finish exactly."""

from __future__ import annotations

import threading

from grpc_helpers import stream_generate
from pagetron.backend import SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time", "In 1969, the first humans", "def fibonacci(n):"]


def test_a_60_mb_prompt_is_refused_at_once_and_disturbs_nothing(triton_server, tiny_llm):
    params = {"temperature": 0, "max_tokens": 64, "ignore_eos": True}
    expected = tiny_llm.generate(PROMPTS, SamplingParams(**params), use_tqdm=False)
    server_pid, stubs = triton_server.pid, triton_server.stub_pids()
    results = {}

    def one(prompt):
        results[prompt] = stream_generate(triton_server.grpc_url, prompt, params, stream=True)

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    huge = stream_generate(triton_server.grpc_url, "word " * 12_000_000, params, stream=True)
    for t in threads:
        t.join(120)
    assert huge.error.startswith("[INVALID_ARG] prompt: 60000000 bytes of text cannot fit max_model_len")
    assert huge.error.endswith("(refused without tokenizing)")
    for prompt, out in zip(PROMPTS, expected):
        assert results[prompt].error is None and results[prompt].token_ids == out.outputs[0].token_ids
    assert triton_server.pid == server_pid and triton_server.stub_pids() == stubs
    assert triton_server.process.poll() is None and triton_server.is_ready()
