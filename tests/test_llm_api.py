"""The offline API on the bundled SmolLM2: output shape, n > 1, seeds, stop strings, logprobs, errors."""

from __future__ import annotations

import json

import pytest

from pagetron.backend import LLM, InvalidRequestError, SamplingParams, SamplingParamsError
from pagetron.backend.cli import main as cli_main
from pagetron.backend.engine.output_processor import OutputKind

GIRL = "Once upon a time, there was a little girl named"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def test_output_shape_and_known_greedy_continuation(smollm):
    [out] = smollm.generate(GIRL, GREEDY, use_tqdm=False)
    assert out.prompt == GIRL
    assert out.prompt_token_ids == [6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8180, 3365]
    [c] = out.outputs
    assert c.text.startswith(" Emma who loved to play")
    assert len(c.token_ids) == 12 and c.finish_reason == "length" and out.finished
    assert c.text == smollm.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_chat_answer_ends_with_eos(smollm):
    [out] = smollm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=64),
        use_tqdm=False,
    )
    c = out.outputs[0]
    assert "Paris" in c.text
    assert c.finish_reason == "stop" and c.token_ids[-1] == 2  # <|im_end|>
    assert "<|im_end|>" not in c.text


def test_a_messages_prompt_is_the_chat_template_path(smollm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    [chat] = smollm.chat(messages, params, use_tqdm=False)
    [generated] = smollm.generate({"messages": messages}, params, use_tqdm=False)
    assert generated.prompt_token_ids == chat.prompt_token_ids == smollm.encode_chat(messages)
    assert generated.outputs[0].token_ids == chat.outputs[0].token_ids
    text = smollm.tokenizer.decode(chat.prompt_token_ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith(
        "<|im_start|>assistant\n"
    )


def test_n_greedy_copies_are_identical_and_share_the_prompt_blocks(smollm):
    [out] = smollm.generate(
        GIRL + " Lily", SamplingParams(n=3, temperature=0.0, max_tokens=8), use_tqdm=False
    )
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == out.outputs[2].token_ids


def test_seeded_sampling_repeats_exactly_whatever_the_batch(smollm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16)
    [alone] = smollm.generate(GIRL, params, use_tqdm=False)
    others = SamplingParams(temperature=1.0, max_tokens=20)
    batch = smollm.generate(
        ["The sea is", GIRL, "My favourite food"], [others, params, others], use_tqdm=False
    )
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids
    [other_seed] = smollm.generate(
        GIRL, SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16), use_tqdm=False
    )
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids


def test_seeded_n_gives_distinct_but_repeatable_samples(smollm):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=16)
    [a] = smollm.generate(GIRL, params, use_tqdm=False)
    [b] = smollm.generate(GIRL, params, use_tqdm=False)
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert a.outputs[0].token_ids != a.outputs[1].token_ids


def test_stop_string_spanning_tokens_truncates_and_finishes(smollm):
    [out] = smollm.generate(
        GIRL, SamplingParams(temperature=0.0, max_tokens=30, stop=["to pl"]), use_tqdm=False
    )
    c = out.outputs[0]
    assert c.text == " Emma who loved "
    assert (c.finish_reason, c.stop_reason) == ("stop", "to pl")
    [out] = smollm.generate(
        GIRL,
        SamplingParams(temperature=0.0, max_tokens=30, stop=["to pl"], include_stop_str_in_output=True),
        use_tqdm=False,
    )
    assert out.outputs[0].text == " Emma who loved to pl"


def test_stop_token_ids_and_ignore_eos(smollm):
    [ref] = smollm.generate(GIRL, GREEDY, use_tqdm=False)
    stop_id = ref.outputs[0].token_ids[3]
    [out] = smollm.generate(
        GIRL, SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_id]), use_tqdm=False
    )
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids[:4]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop_id)
    chat = smollm.encode_chat([{"role": "user", "content": "Say hi."}])
    [out] = smollm.generate(
        {"prompt_token_ids": chat},
        SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        use_tqdm=False,
    )
    assert len(out.outputs[0].token_ids) == 40 and out.outputs[0].finish_reason == "length"


def test_logprobs_top_n_and_cumulative(smollm):
    [out] = smollm.generate(GIRL, SamplingParams(temperature=0.0, max_tokens=5, logprobs=3), use_tqdm=False)
    c = out.outputs[0]
    assert len(c.logprobs) == 5
    total = 0.0
    for token, step in zip(c.token_ids, c.logprobs):
        assert len(step) == 3 and step[token].rank == 1  # greedy: the sampled token is the top one
        assert sorted(lp.rank for lp in step.values()) == [1, 2, 3]
        assert all(lp.logprob <= 0 for lp in step.values())
        total += step[token].logprob
    assert c.logprobs[0][c.token_ids[0]].decoded_token == " Emma"
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_streaming_deltas_concatenate_to_the_final_text(smollm):
    engine = smollm.engine
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=1)
    cumulative = engine.add_request("Write a line about the moon:", params)
    delta = engine.add_request("Write a line about the moon:", params, output_kind=OutputKind.DELTA)
    assert delta != cumulative
    pieces, delta_pieces, delta_ids, final = [], [], [], {}
    while len(final) < 2:
        for out in engine.step():
            if out.request_id == cumulative:
                pieces.append(out.outputs[0].delta_text)
            else:
                delta_pieces.append(out.outputs[0].text)
                delta_ids += out.outputs[0].token_ids
                assert len(out.outputs[0].logprobs) == len(out.outputs[0].token_ids)
            if out.finished:
                final[out.request_id] = out
    text = final[cumulative].outputs[0].text
    assert "".join(pieces) == text == "".join(delta_pieces) and len(pieces) > 5
    assert delta_ids == final[cumulative].outputs[0].token_ids
    assert len(final[cumulative].outputs[0].logprobs) == 24


def test_abort_frees_every_block_at_once(smollm):
    engine = smollm.engine
    request_id = engine.add_request(GIRL, SamplingParams(temperature=0.0, max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    out = engine.abort_request(request_id)
    assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) == 3
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def short_llm():
    return LLM(max_model_len=256, kv_cache_memory_gb=0.05)


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", GREEDY, "prompt"),
        ([], GREEDY, "prompt_token_ids"),
        ([1, 2, 49152], GREEDY, "prompt_token_ids"),
        ("hi " * 300, GREEDY, "prompt"),
        (3.5, GREEDY, "prompt"),
    ],
)
def test_bad_prompts_name_the_field_and_leave_the_batch_alone(short_llm, prompt, params, field):
    llm = short_llm
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([GIRL, prompt], params, use_tqdm=False)
    assert e.value.field == field and "prompt 1" in str(e.value)
    assert not llm.engine.has_unfinished_requests()
    # the engine keeps serving: a request already in flight is unaffected by a rejected one
    request_id = llm.engine.add_request(GIRL, GREEDY)
    with pytest.raises(InvalidRequestError):
        llm.engine.add_request(prompt, params)
    outs = []
    while llm.engine.has_unfinished_requests():
        outs += [o for o in llm.engine.step() if o.finished]
    assert [o.request_id for o in outs] == [request_id]
    assert outs[0].outputs[0].text.startswith(" Emma who loved to play")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and field in str(e.value)


def test_unknown_sampling_key_is_rejected():
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams.from_dict({"max_tokens": 4, "temprature": 0.5})
    assert e.value.field == "temprature"


def test_request_that_can_never_fit_the_kv_cache_is_rejected_up_front():
    llm = LLM(num_kv_blocks=2, block_size=16)
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(GIRL, SamplingParams(max_tokens=40), use_tqdm=False)
    assert e.value.field == "max_tokens" and "holds 32" in str(e.value)


def test_unknown_engine_argument_is_rejected():
    with pytest.raises(ValueError, match="max_num_seq"):
        LLM(max_num_seq=4)


def test_cli_generate_writes_jsonl(tmp_path, capsys):
    requests = tmp_path / "in.jsonl"
    requests.write_text(
        json.dumps({"prompt": GIRL, "sampling_params": {"max_tokens": "6"}})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "What is the capital of France?"}]})
        + "\n"
    )
    out_path = tmp_path / "out.jsonl"
    rc = cli_main(
        [
            "generate",
            "--input",
            str(requests),
            "--output",
            str(out_path),
            "--max-tokens",
            "24",
            "--kv-cache-memory-gb",
            "0.05",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert rows[0]["outputs"][0]["text"].startswith(" Emma who")
    assert len(rows[0]["outputs"][0]["token_ids"]) == 6
    assert "Paris" in rows[1]["outputs"][0]["text"]
    rc = cli_main(["generate", "--max-tokens", "0", "hello"])
    assert rc == 2 and "max_tokens" in capsys.readouterr().err


def test_cli_chat_streams_answers_and_keeps_history(monkeypatch, capsys):
    questions = iter(["What is the capital of France?", "", "And of Italy?"])

    def fake_input(prompt=""):
        try:
            return next(questions)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    rc = cli_main(["chat", "--max-tokens", "24", "--kv-cache-memory-gb", "0.05"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "Rome" in out
