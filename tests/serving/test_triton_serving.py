"""Model `llm` served by the real tritonserver: outputs equal the offline engine's, streaming and not,
over gRPC and HTTP; cancellation frees KV blocks; metrics count exactly; bad input gets INVALID_ARG."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from grpc_helpers import make_inputs, scrape_metrics, stream_generate
from pagetron.backend import SamplingParams
from pagetron.client import TritonRequestError

QUESTIONS = [
    "Once upon a time, there was a little girl named",
    "The capital of France is",
    "def add(a, b):",
    "The three primary colors are",
    "Water boils at",
    "My favourite fruit is",
    "In the morning I like to",
    "The quick brown fox",
]
PROMPTS = [q + suffix for q in QUESTIONS for suffix in ("", " (really)")]  # 16 prompts


@pytest.fixture(scope="module")
def offline(tiny_llm):
    outs = tiny_llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    return {p: (o.outputs[0].text, o.outputs[0].token_ids) for p, o in zip(PROMPTS, outs)}


def test_16_concurrent_grpc_streams_equal_the_offline_engine(triton_server, offline):
    results: dict[str, object] = {}

    def run(prompt):
        results[prompt] = stream_generate(
            triton_server.grpc_url, prompt, {"temperature": 0, "max_tokens": 16}, stream=True
        )

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for prompt in PROMPTS:
        r = results[prompt]
        assert r.error is None, r.error
        assert (r.text, r.token_ids) == offline[prompt], prompt
        # one streamed response per step; tokens are coalesced only when the output thread fell behind
        assert min(2, len(r.token_ids)) <= r.num_responses <= len(r.token_ids)
        assert r.finish_reason in ("stop", "length")


def test_non_streaming_sends_one_response_with_the_whole_text(triton_server, offline):
    prompt = PROMPTS[0]
    r = stream_generate(triton_server.grpc_url, prompt, {"temperature": 0, "max_tokens": 16}, stream=False)
    assert r.num_responses == 1 and (r.text, r.token_ids) == offline[prompt]
    r = stream_generate(
        triton_server.grpc_url, prompt, {"temperature": 0, "max_tokens": 16}, exclude_input_in_output=False
    )
    assert r.text == prompt + offline[prompt][0]


def _post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_http_generate_and_generate_stream(triton_server, offline):
    prompt = PROMPTS[1]
    base = f"http://{triton_server.http_url}/v2/models/llm"
    status, body = _post(
        f"{base}/generate", {"text_input": prompt, "parameters": {"temperature": "0", "max_tokens": "16"}}
    )
    # without exclude_input_in_output, a non-streaming answer starts with the prompt (as the vLLM backend's)
    assert status == 200 and json.loads(body)["text_output"] == prompt + offline[prompt][0]
    status, body = _post(
        f"{base}/generate_stream",
        {
            "text_input": prompt,
            "stream": True,
            "sampling_parameters": json.dumps({"temperature": 0, "max_tokens": 16}),
        },
    )
    events = [json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and "".join(e["text_output"] for e in events) == offline[prompt][0]
    # an event per response; a response carries every token made since the last one was sent (one, unless
    # the output thread fell behind the engine and coalesced them)
    ids = [e["output_ids"] if isinstance(e["output_ids"], list) else [e["output_ids"]] for e in events]
    assert [t for chunk in ids for t in chunk] == offline[prompt][1] and len(events) > 1


def test_n_outputs_and_extra_outputs(triton_server):
    r = stream_generate(
        triton_server.grpc_url,
        PROMPTS[0],
        {"n": 2, "temperature": 0, "max_tokens": 4},
        return_num_output_tokens=True,
        return_num_input_tokens=True,
        return_cumulative_logprob=True,
        return_logprobs=True,
    )
    assert r.error is None and r.token_ids[:4] == r.token_ids[4:]  # both greedy copies, concatenated


def test_messages_input_is_rendered_with_the_chat_template_by_the_server(triton_server, tiny_llm):
    from pagetron.client import GenerateRequest, TritonLLMClient

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = tiny_llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    request = GenerateRequest(messages, {"temperature": 0, "max_tokens": 12}, return_num_input_tokens=True)
    with TritonLLMClient(triton_server.grpc_url) as client:
        result = client.complete(request, timeout=120)
        bad = GenerateRequest(
            [{"role": "user", "content": "x", "tool_calls": [{"id": "c1"}]}], {"max_tokens": 2}
        )
        with pytest.raises(TritonRequestError) as raised:
            client.complete(bad, timeout=60)
    assert result.token_ids[0] == expected.outputs[0].token_ids and result.text == expected.outputs[0].text
    assert result.num_input_tokens == len(expected.prompt_token_ids)
    assert raised.value.code == "INVALID_ARG" and raised.value.message.startswith("messages[0].tool_calls: ")


@pytest.mark.parametrize(
    "prompt, sampling, field",
    [
        ("Hi", {"temprature": 0.5}, "temprature"),
        ("Hi", {"max_tokens": "many"}, "max_tokens"),
        ("Hi", {"top_p": 1.5}, "top_p"),
        ("Hi", {"max_tokens": 0}, "max_tokens"),
        ("Hi", {"max_tokens": 4, "lora_name": "/etc/passwd"}, "lora_name"),  # no field reads a path
        ("Hi", "{not json", "sampling_parameters"),
        ("word " * 9000, {"max_tokens": 4}, "prompt"),
        (b"\xff\xfe broken", {"max_tokens": 4}, "text_input"),
        (None, {"max_tokens": 4}, "text_input"),
        ("", {"max_tokens": 4}, "text_input"),
        ([1, 2, 99999], {"max_tokens": 4}, "prompt_token_ids"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "out-of-range",
        "zero-max-tokens",
        "lora-path",
        "bad-json",
        "too-long",
        "invalid-utf8",
        "missing-prompt",
        "empty-prompt",
        "bad-token-id",
    ],
)
def test_bad_input_gets_invalid_arg_and_the_server_keeps_serving(triton_server, prompt, sampling, field):
    r = stream_generate(triton_server.grpc_url, prompt, sampling)
    assert r.error is not None and field in r.error and r.num_responses == 1
    if isinstance(prompt, str) and prompt and not isinstance(sampling, str):
        # over HTTP the error code is visible: INVALID_ARG is 400 (a gRPC stream carries only the message)
        body = {"text_input": prompt, "parameters": sampling}
        status, text = _post(f"http://{triton_server.http_url}/v2/models/llm/generate", body)
        assert status == 400 and field in json.loads(text)["error"]
    ok = stream_generate(triton_server.grpc_url, "Hello", {"temperature": 0, "max_tokens": 2})
    assert ok.error is None and len(ok.token_ids) == 2


def test_cancel_mid_stream_frees_kv_and_spares_other_streams(triton_server, offline):
    import queue

    import tritonclient.grpc as grpcclient

    survivor: dict = {}
    thread = threading.Thread(
        target=lambda: survivor.update(
            r=stream_generate(triton_server.grpc_url, PROMPTS[2], {"temperature": 0, "max_tokens": 16})
        )
    )
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer(
        "llm",
        make_inputs(
            "Tell me a very long story about dragons.", {"max_tokens": 400, "ignore_eos": True}, stream=True
        ),
    )
    thread.start()
    for _ in range(3):
        result, error = got.get(timeout=60)
        assert error is None
    deadline = time.monotonic() + 5  # the gauges are refreshed a few times a second
    while scrape_metrics(triton_server.metrics_url)["vllm:gpu_cache_usage_perc"] == 0:
        assert time.monotonic() < deadline, "the KV-usage gauge never rose"
        time.sleep(0.1)
    client.stop_stream(cancel_requests=True)
    client.close()
    thread.join(120)
    assert (
        survivor["r"].error is None and (survivor["r"].text, survivor["r"].token_ids) == offline[PROMPTS[2]]
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = scrape_metrics(triton_server.metrics_url)
        if m["vllm:gpu_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0:
            break
        time.sleep(0.2)
    assert m["vllm:gpu_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0


def test_metrics_move_by_exactly_the_tokens_generated(triton_server):
    before = scrape_metrics(triton_server.metrics_url)
    results = [
        stream_generate(triton_server.grpc_url, p, {"temperature": 0, "max_tokens": 7, "ignore_eos": True})
        for p in ([5, 6, 7, 8], [9, 10, 11])
    ]
    expected = before["vllm:generation_tokens_total"] + 14
    deadline = time.monotonic() + 5  # metrics are applied by their own thread, a few times a second
    while (after := scrape_metrics(triton_server.metrics_url))["vllm:generation_tokens_total"] < expected:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)  # and nothing more arrives
    after = scrape_metrics(triton_server.metrics_url)
    assert all(len(r.token_ids) == 7 for r in results)
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 14
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == 7
    assert (
        after["vllm:e2e_request_latency_seconds_count"] - before["vllm:e2e_request_latency_seconds_count"]
        == 2
    )
    assert (
        after["vllm:time_to_first_token_seconds_count"] - before["vllm:time_to_first_token_seconds_count"]
        == 2
    )
    assert (
        after["vllm:time_per_output_token_seconds_count"] - before["vllm:time_per_output_token_seconds_count"]
        == 12
    )
