"""The official openai client against `pagetron openai` in front of the real tritonserver: completions and
chat, streaming and not, equal the offline engine token for token; usage counts, n, seed, stop,
penalties, logprobs and finish_reason are right."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from grpc_helpers import scrape_metrics
from pagetron.backend import SamplingParams

CHAT = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colors."},
        {"role": "assistant", "content": "Red, green, blue."},
        {"role": "user", "content": "Two more?"},
    ],
]
PROMPTS = ["Once upon a time, there was a little girl named", "The capital of France is"]


@pytest.fixture(scope="module")
def offline(tiny_llm):
    return tiny_llm  # the served model, offline: greedy outputs do not depend on engine arguments


@pytest.fixture(scope="module")
def client(openai_stack):
    return openai_stack.frontend.client()


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kwargs)


def test_completions_equal_the_offline_engine_with_usage(client, offline):
    response = client.completions.create(model="llm", prompt=PROMPTS, max_tokens=12, temperature=0)
    expected = offline.generate(PROMPTS, greedy(max_tokens=12), use_tqdm=False)
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [o.outputs[0].text for o in expected]
    assert [c.finish_reason for c in response.choices] == [o.outputs[0].finish_reason for o in expected]
    assert response.object == "text_completion" and response.model == "llm"
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert response.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_completion_from_token_ids_and_echo(client, offline):
    ids = offline.tokenizer(PROMPTS[1]).input_ids
    by_ids = client.completions.create(model="llm", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(
        model="llm", prompt=PROMPTS[1], max_tokens=6, temperature=0, echo=True
    )
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_text.choices[0].text == PROMPTS[1] + by_ids.choices[0].text


def test_streamed_completion_with_usage(client, offline):
    stream = client.completions.create(
        model="llm",
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    expected = offline.generate(PROMPTS[0], greedy(max_tokens=12), use_tqdm=False)[0]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.outputs[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_token_ids)
    assert chunks[-1].usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_chat_equals_the_offline_chat_template_path(client, offline):
    for messages in CHAT:
        response = client.chat.completions.create(
            model="llm", messages=messages, max_completion_tokens=24, temperature=0
        )
        expected = offline.chat(messages, greedy(max_tokens=24), use_tqdm=False)[0]
        choice = response.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == expected.outputs[0].text
        assert choice.finish_reason == expected.outputs[0].finish_reason
        assert response.usage.prompt_tokens == len(offline.encode_chat(messages))
        assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_multi_turn_replays_the_assistant_message_and_tool_turns(client, offline):
    messages = [{"role": "user", "content": "Name a fruit."}]
    first = client.chat.completions.create(model="llm", messages=messages, max_tokens=8, temperature=0)
    messages.append(first.choices[0].message)  # the client's own object: refusal, tool_calls... all null
    messages.append({"role": "user", "content": "And a vegetable?"})
    second = client.chat.completions.create(model="llm", messages=messages, max_tokens=8, temperature=0)
    replay = [messages[0], {"role": "assistant", "content": first.choices[0].message.content}, messages[2]]
    expected = offline.chat(replay, greedy(max_tokens=8), use_tqdm=False)[0]
    assert second.choices[0].message.content == expected.outputs[0].text
    tool_turn = [*replay, {"role": "tool", "content": "carrot", "tool_call_id": "call_1"}]
    assert client.chat.completions.create(model="llm", messages=tool_turn, max_tokens=2).choices


def test_streamed_chat_sends_role_first_then_content_finish_and_usage(client, offline):
    stream = client.chat.completions.create(
        model="llm",
        messages=CHAT[0],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    expected = offline.chat(CHAT[0], greedy(max_tokens=10), use_tqdm=False)[0].outputs[0]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(content) == expected.text
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids) and chunks[-1].choices == []
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_raw_event_stream_ends_with_done(openai_stack):
    frontend = openai_stack.frontend
    body = {"model": "llm", "messages": CHAT[0], "max_tokens": 3, "stream": True}
    headers = {"authorization": f"Bearer {frontend.api_key}"}
    with httpx.stream("POST", f"{frontend.base_url}/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_n_and_seed_are_reproducible_and_equal_offline(client, offline):
    kwargs = dict(model="llm", messages=CHAT[0], max_tokens=12, temperature=0.9, top_p=0.95, n=3, seed=7)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    expected = offline.chat(
        CHAT[0], SamplingParams(temperature=0.9, top_p=0.95, n=3, seed=7, max_tokens=12), use_tqdm=False
    )[0]
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]
    assert texts == [o.text for o in sorted(expected.outputs, key=lambda o: o.index)]
    assert first.usage.completion_tokens == sum(len(o.token_ids) for o in expected.outputs)


def test_stop_and_penalties_reach_the_engine(client, offline):
    prompt = "Count: one, two, three,"
    plain = offline.generate(prompt, greedy(max_tokens=32), use_tqdm=False)[0].outputs[0].text
    stop = plain[len(plain) // 2 :][:3]  # a string the model is known to produce, mid-way
    stopped = client.completions.create(model="llm", prompt=prompt, max_tokens=32, temperature=0, stop=[stop])
    expected = offline.generate(prompt, greedy(max_tokens=32, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert stopped.choices[0].text == expected.text and stop not in expected.text
    assert stopped.choices[0].finish_reason == expected.finish_reason == "stop"
    penalised = client.completions.create(
        model="llm", prompt=prompt, max_tokens=16, temperature=0, presence_penalty=1.5, frequency_penalty=1.0
    )
    params = greedy(max_tokens=16, presence_penalty=1.5, frequency_penalty=1.0)
    assert penalised.choices[0].text == offline.generate(prompt, params, use_tqdm=False)[0].outputs[0].text
    plain = offline.generate(prompt, greedy(max_tokens=16), use_tqdm=False)[0].outputs[0].text
    assert penalised.choices[0].text != plain  # the penalties changed something, so the test can fail


def test_chat_logprobs_match_the_engine(client, offline):
    response = client.chat.completions.create(
        model="llm", messages=CHAT[0], max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    expected = offline.chat(CHAT[0], greedy(max_tokens=6, logprobs=3), use_tqdm=False)[0].outputs[0]
    content = response.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == 6
    for entry, token_id, step in zip(content, expected.token_ids, expected.logprobs):
        assert entry.logprob == pytest.approx(step[token_id].logprob, abs=1e-4)
        assert entry.token == step[token_id].decoded_token
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token is the most likely
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )


def test_streamed_completion_logprobs(client):
    stream = client.completions.create(
        model="llm", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=2, stream=True
    )
    chunks = [c for c in stream if c.choices]
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens) == "".join(c.choices[0].text for c in chunks)
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert all(
        len(top) == 2 for c in chunks if c.choices[0].logprobs for top in c.choices[0].logprobs.top_logprobs
    )


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list().data]
    assert "llm" in ids
    assert client.models.retrieve("llm").id == "llm"


def settled_generation_tokens(metrics_url: str) -> float:
    """The generated-token counter once the model's metrics thread has published everything."""
    previous = None
    for _ in range(40):
        m = scrape_metrics(metrics_url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:generation_tokens_total"] == previous:
            return previous
        previous = m["vllm:generation_tokens_total"]
        time.sleep(0.5)
    raise AssertionError("the metrics never settled")


def test_health_runs_a_real_generation(openai_stack):
    before = settled_generation_tokens(openai_stack.server.metrics_url)
    response = httpx.get(f"{openai_stack.frontend.root_url}/health", timeout=30)
    assert response.status_code == 200 and response.json() == {"status": "ok", "generated_tokens": 1}
    assert settled_generation_tokens(openai_stack.server.metrics_url) == before + 1


def test_streamed_completion_of_two_prompts_with_n_2_numbers_choices_like_openai(client):
    kwargs = dict(model="llm", prompt=PROMPTS, max_tokens=6, temperature=0.8, seed=3, n=2)
    whole = client.completions.create(**kwargs)
    texts = {i: "" for i in range(4)}
    reasons = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert [reasons[i] for i in range(4)] == [c.finish_reason for c in whole.choices]


def test_the_frontend_process_has_no_torch_loaded(openai_stack, client):
    client.models.list()  # it has served a request
    maps = Path(f"/proc/{openai_stack.frontend.process.pid}/maps").read_text()
    assert "libtorch" not in maps and "libc10" not in maps
