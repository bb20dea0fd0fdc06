"""Constrained decoding offline: every kind of constraint on SmolLM2, the token-level mask check under
async scheduling, preemption, chunked prefill, prefix caching, n > 1, logprobs and stop strings, refusals
that name the problem, a request waiting for its grammar while others run, and random schemas."""

from __future__ import annotations

import functools
import json
import re
import time
from concurrent.futures import Future

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_factory import make_hf_model
from pagetron.backend import LLM
from pagetron.backend.core.errors import InvalidRequestError
from pagetron.backend.core.sampling_params import SamplingParams, SamplingParamsError
from pagetron.backend.core.structured_outputs import StructuredOutputsParams
from pagetron.backend.engine.grammar import SequenceGrammar, fill_bitmasks
from pagetron.backend.executor.executor import UniprocExecutor

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "height_m": {"type": "number"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "role", "address"],
}


def constrained(max_tokens: int = 96, **kind) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, structured_outputs=kind)


# ---- parameters ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
        ({}, "structured_outputs"),
        ({"json": "{not json"}, "structured_outputs.json"),
        ({"json": [1, 2]}, "structured_outputs.json"),
        ({"choice": []}, "structured_outputs.choice"),
        ({"choice": ["a", 3]}, "structured_outputs.choice"),
        ({"regex": ""}, "structured_outputs.regex"),
        ({"grammar": 5}, "structured_outputs.grammar"),
        ({"regex": "a", "whitespace_pattern": " "}, "structured_outputs.whitespace_pattern"),
        ({"regex": "a", "backend": "outlines"}, "structured_outputs.backend"),
        ({"json": "[" * 100_000}, "structured_outputs.json"),  # nested too deep to parse
        ({"json": json.loads('{"items": ' * 64 + "{}" + "}" * 64)}, "structured_outputs.json"),
    ],
)
def test_malformed_constraints_name_their_key(given, field):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams.from_dict({"structured_outputs": given})
    assert e.value.field == field


def test_guided_decoding_is_the_older_name():
    params = SamplingParams.from_json('{"guided_decoding": {"choice": ["x", "y"], "backend": "xgrammar"}}')
    assert params.structured_outputs == StructuredOutputsParams(choice=["x", "y"])
    with pytest.raises(SamplingParamsError, match="not both"):
        SamplingParams.from_dict({"guided_decoding": {"regex": "a"}, "structured_outputs": {"regex": "a"}})
    # equal schemas share one cache key whatever their key order or form
    a = StructuredOutputsParams(json={"type": "object", "required": ["a"]})
    b = StructuredOutputsParams(json='{"required": ["a"], "type": "object"}')
    assert a.key() == b.key()


# ---- SmolLM2: outputs parse, validate and end with the grammar ---------------------------------------------
def test_json_schema_outputs_validate(smollm):
    prompt = "Describe a fictional person as JSON with name, age, role, tags and address."
    sampled = SamplingParams(max_tokens=160, temperature=0.8, seed=7, structured_outputs={"json": PERSON})
    outs = smollm.generate([prompt, prompt], [constrained(160, json=PERSON), sampled], use_tqdm=False)
    for c in [c for o in outs for c in o.outputs]:
        assert c.finish_reason == "stop", c.text
        assert c.token_ids[-1] == 2  # the grammar allowed EOS (<|im_end|>) only once complete
        jsonschema.validate(json.loads(c.text), PERSON)


def test_choice_regex_grammar_and_json_object(smollm):
    prompts = [
        "Is the sky blue? Answer:",
        "Today's date in ISO format:",
        "Write an addition:",
        "Reply with a short JSON list of three numbers.",
    ]
    params = [
        constrained(choice=["yes", "no", "maybe"]),
        constrained(regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"),
        constrained(grammar='root ::= num " + " num " = " num\nnum ::= [1-9] [0-9]?'),
        constrained(40, json_object=True),
    ]
    choice, date, addition, anything = (
        o.outputs[0] for o in smollm.generate(prompts, params, use_tqdm=False)
    )
    assert choice.text in ("yes", "no", "maybe") and choice.finish_reason == "stop"
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]", date.text), date.text
    assert re.fullmatch(r"[1-9][0-9]? \+ [1-9][0-9]? = [1-9][0-9]?", addition.text), addition.text
    assert anything.finish_reason == "stop" and isinstance(json.loads(anything.text), (dict, list))


def test_invalid_constraints_are_refused_before_anything_runs(smollm):
    cases = [
        ({"json": {"type": "foo"}}, "structured_outputs.json", "'foo' is not valid"),
        ({"json": {"type": "integer", "minimum": "ten"}}, "structured_outputs.json", "at minimum"),
        ({"regex": "(ab"}, "structured_outputs.regex", "parenthesis is not closed"),
        ({"grammar": "root ::= missing"}, "structured_outputs.grammar", 'Rule "missing" is not defined'),
        (
            {"json": {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 0.5}}}},
            "structured_outputs.json",
            "not supported at /properties/n: multipleOf is enforced only",
        ),
    ]
    for kind, field, words in cases:
        with pytest.raises(InvalidRequestError) as e:
            smollm.generate(["x"], SamplingParams(structured_outputs=kind), use_tqdm=False)
        assert e.value.field == field and words in str(e.value), str(e.value)
    assert not smollm.engine.has_unfinished_requests()


# ---- the mask, token by token, under everything that reschedules a sequence -----------------------------
class MaskCheckingExecutor(UniprocExecutor):
    """The default executor; every sampled token of a constrained row is checked against its bitmask."""

    def __init__(self, spec):
        super().__init__(spec)
        self.checked = 0
        self.violations: list[tuple[int, int]] = []
        self.ran_ahead = 0  # constrained rows launched before their previous token was applied

    def execute(self, out):
        return self.launch(out).result()

    def launch(self, out):
        step = super().launch(out)
        grammar = out.grammar  # its bitmask is filled when the step samples (later, if it ran ahead)
        if grammar is not None:
            self.ran_ahead += sum(out.sampled_seqs[row].num_pending_tokens > 1 for row in grammar.rows)
        result = step.result

        def checked_result():
            output = result()
            if grammar is not None:
                for k, row in enumerate(grammar.rows):
                    token = output.token_ids[row]
                    self.checked += 1
                    if not (int(grammar.bitmask[k, token // 32]) >> (token % 32)) & 1:
                        self.violations.append((row, token))
            return output

        step.result = checked_result
        return step


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    return str(
        make_hf_model(
            tmp_path_factory.mktemp("so"),
            "llama",
            num_kv_heads=2,
            tie_word_embeddings=True,
            vocab_size=49152,
            with_tokenizer=True,
            seed=3,
        )
    )


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_no_sampled_token_leaves_the_mask(tiny_with_tokenizer, async_scheduling):
    # a tiny random model: its unconstrained text is noise, so every structure below comes from the masks.
    # 16 blocks of 4 tokens for 7 sequences of 24-token prompts force preemptions; a 24-token budget
    # chunks prefills.
    llm = LLM(
        tiny_with_tokenizer,
        block_size=4,
        num_kv_blocks=16,
        reserve_kv_for_growth=False,
        max_num_batched_tokens=24,
        max_num_seqs=12,
        async_scheduling=async_scheduling,
        executor_factory=MaskCheckingExecutor,
    )
    llm.engine.fill_masks_on_thread = True  # as on a GPU host, however few cores this one has
    shared = "You are a helpful assistant that always answers in JSON. " * 2
    enum_schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 22, 333]}},
        "required": ["ok", "n"],
    }
    params = [
        SamplingParams(
            max_tokens=40,
            temperature=1.0,
            seed=5,
            n=3,
            logprobs=2,
            structured_outputs={"json": enum_schema, "disable_any_whitespace": True},
        ),
        SamplingParams(max_tokens=12, temperature=0, structured_outputs={"regex": "[a-c]{3}-[0-9]{2}"}),
        SamplingParams(
            max_tokens=12, temperature=0.9, seed=1, structured_outputs={"choice": ["alpha", "beta", "gamma"]}
        ),
        SamplingParams(
            max_tokens=30,
            temperature=0,
            stop=[","],
            structured_outputs={"json": enum_schema, "disable_any_whitespace": True},
        ),
        SamplingParams(max_tokens=20, temperature=0),  # unconstrained, beside them
    ]
    prompts = [
        shared + "First.",
        shared + "Second.",
        shared + "Third.",
        shared + "Fourth.",
        shared + "Fifth.",
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    executor = llm.engine.executor
    assert executor.violations == [] and executor.checked > 40
    # with asynchronous scheduling constrained rows run ahead: sampled once their previous token is applied
    assert (executor.ran_ahead > 0) == async_scheduling
    # ... and their masks are filled on a thread while the engine thread does the rest of its step
    assert (llm.engine.scheduler.mask_stats.on_thread > 0) == async_scheduling
    assert llm.engine.scheduler.num_preemptions > 0
    # seeded and greedy: the same texts with or without async scheduling, however often preempted
    texts = [c.text for o in outs[:4] for c in o.outputs]
    assert texts == [
        '{"ok": true, "n": 1}',
        '{"ok": true, "n": 1}',
        '{"ok": true, "n": 333}',
        "acc-11",
        "beta",
        '{"ok": false',
    ]
    for c in outs[0].outputs:
        assert c.finish_reason == "stop" and c.token_ids[-1] == 2
        assert len(c.logprobs) == len(c.token_ids)
    stopped = outs[3].outputs[0]  # the stop string ends it before the grammar does
    assert stopped.finish_reason == "stop" and stopped.stop_reason == ","
    # the same requests again hit the prefix cache and give the same greedy outputs
    again = llm.generate(prompts[1:2], params[1:2], use_tqdm=False)
    assert again[0].num_cached_tokens > 0 and again[0].outputs[0].text == outs[1].outputs[0].text


def test_async_and_sync_scheduling_agree_under_grammars(tiny_with_tokenizer):
    params = SamplingParams(max_tokens=24, temperature=0, structured_outputs={"regex": "(x|yy|zzz){2,6}"})
    texts = []
    for async_scheduling in (False, True):
        llm = LLM(tiny_with_tokenizer, async_scheduling=async_scheduling, num_kv_blocks=64)
        texts.append([o.outputs[0].text for o in llm.generate(["a", "bb", "ccc"], params, use_tqdm=False)])
    assert texts[0] == texts[1] and all(re.fullmatch("(x|yy|zzz){2,6}", t) for t in texts[0])


def test_an_abort_while_masks_fill_on_a_thread_spares_the_other_request(tiny_with_tokenizer):
    params = SamplingParams(max_tokens=16, temperature=0, structured_outputs={"regex": "(x|yy|zzz){8,12}"})
    [reference] = LLM(tiny_with_tokenizer, num_kv_blocks=64).generate(["b"], params, use_tqdm=False)
    llm = LLM(tiny_with_tokenizer, num_kv_blocks=64, async_scheduling=True)
    engine = llm.engine
    engine.fill_masks_on_thread = True
    first, second = (engine.add_request(prompt, params) for prompt in (engine.tokenize("a")[1], "b"))
    texts = {}
    for _ in range(4):
        assert not any(output.finished for output in engine.step())
    assert engine.scheduler.mask_stats.on_thread > 0  # a fill may be running now
    assert engine.abort_request(first).outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id == second
            texts[second] = output.outputs[0].text
    assert texts == {second: reference.outputs[0].text}
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_min_tokens_holds_beside_constrained_rows_whose_sampling_waits(tiny_with_tokenizer):
    """An unconstrained row with min_tokens in a step whose sampling waits for the grammars (a constrained
    row ran ahead) is counted as of its launch, not after the next step was scheduled."""
    regex = {"regex": "(x|yy|zzz){20,30}"}
    constrained = SamplingParams(max_tokens=40, temperature=0, structured_outputs=regex)
    lengths = []
    for async_scheduling, thread in ((False, False), (True, False), (True, True)):
        llm = LLM(tiny_with_tokenizer, num_kv_blocks=128, async_scheduling=async_scheduling)
        llm.engine.fill_masks_on_thread = thread
        eos = min(llm.engine.eos_token_ids)
        eager = SamplingParams(max_tokens=30, temperature=0, min_tokens=10, logit_bias={eos: 100.0})
        outs = llm.generate(["a", "b"], [constrained, eager], use_tqdm=False)
        lengths.append(len(outs[1].outputs[0].token_ids))
        assert outs[1].outputs[0].token_ids[-1] == eos
    assert lengths == [11, 11, 11]  # ten tokens, then the EOS the bias wants


# ---- compiling off the engine thread ---------------------------------------------------------------------
def test_compiles_past_their_limit_leave_room_for_new_ones_up_to_a_bound(tiny_with_tokenizer, monkeypatch):
    """xgrammar's compile cannot be interrupted. When every thread of the compile pool holds a compile
    past its time limit, a new pool takes over and what was queued moves to it; a request for a held
    constraint waits on the same compile; past MAX_OVERDUE_COMPILES such compiles new constraints are
    refused as the server being at capacity. (The gate holds compiles of grammars naming 'held'.)"""
    import threading

    from pagetron.backend.core.errors import AT_CAPACITY, AtCapacityError
    from pagetron.backend.engine import grammar as grammar_module

    engine = LLM(tiny_with_tokenizer, num_kv_blocks=64).engine
    service = grammar_module.GrammarService(
        engine.tokenizer, engine.model_config.vocab_size, sorted(engine.eos_token_ids), 60.0, max_threads=1
    )
    gate, compiler = threading.Event(), service._compiler

    class Gated:
        def compile_grammar(self, grammar):
            if "held" in str(grammar):
                gate.wait(60)
            return compiler.compile_grammar(grammar)

    service._compiler = Gated()

    def running(n: int) -> bool:
        deadline = time.monotonic() + 30
        while len(service._running) != n and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(service._running) == n

    def choice(word: str) -> StructuredOutputsParams:
        return StructuredOutputsParams(choice=[word])

    try:
        [held] = service.grammars(choice("held"), 1)
        assert running(1)
        [quick] = service.grammars(choice("quick"), 1)  # queued behind it, within its time limit
        assert service._queued and len(service._pools) == 1
        service.compile_timeout_s = 0.0  # now the held compile is past its limit
        [quick_again] = service.grammars(choice("quick"), 1)  # the same compile, moved to a new pool
        assert quick_again.compiled is quick.compiled and len(service._pools) == 2
        assert quick.compiled.result(timeout=30) is not None and not held.compiled.done()
        [again] = service.grammars(choice("held"), 1)  # the held compile itself: no second one
        assert again.compiled is held.compiled and running(1)
        [held_too] = service.grammars(choice("held too"), 1)
        assert running(2)
        monkeypatch.setattr(grammar_module, "MAX_OVERDUE_COMPILES", 2)
        with pytest.raises(AtCapacityError, match=f"{AT_CAPACITY}: 2 grammars are still compiling"):
            service.grammars(choice("refused"), 1)
    finally:
        gate.set()
    assert held.compiled.result(timeout=30) is not None and held_too.compiled.result(timeout=30) is not None
    assert running(0)
    [later] = service.grammars(choice("refused"), 1)  # room again
    assert later.compiled.result(timeout=30) is not None
    service.shutdown()
    with pytest.raises(InvalidRequestError, match="shutting down"):
        service.grammars(choice("after"), 1)


def test_a_compiling_request_waits_while_others_run_and_a_late_one_is_refused(tiny_with_tokenizer):
    llm = LLM(tiny_with_tokenizer, num_kv_blocks=64, grammar_compile_timeout_s=0.5)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0, structured_outputs={"choice": ["on", "off"]})
    _, seqs = engine.make_sequences("slow", [5, 6, 7], params)
    compiled = seqs[0].grammar.compiled.result()
    gate: Future = Future()  # the compile, held back until the test lets it finish
    seqs[0].grammar = SequenceGrammar(gate, deadline=time.monotonic() + 60)
    engine.enqueue("slow", None, seqs)
    engine.add_request([8, 9], SamplingParams(max_tokens=4, temperature=0), request_id="plain")
    finished = []
    while "plain" not in finished:
        finished += [o.request_id for o in engine.step() if o.finished]
        assert seqs[0].num_computed_tokens == 0  # passed over, still first in line
    gate.set_result(compiled)
    while "slow" not in finished:
        finished += [o.request_id for o in engine.step() if o.finished]
    assert engine.output_processor.requests == {} and seqs[0].finish_reason == "stop"

    # a compile that never finishes: refused once its deadline passes, naming why; nothing else is hurt
    _, seqs = engine.make_sequences("stuck", [5, 6, 7], params)
    seqs[0].grammar = SequenceGrammar(Future(), deadline=time.monotonic() + 0.2)
    engine.enqueue("stuck", None, seqs)
    errors = []
    while engine.has_unfinished_requests():
        errors += [(o.request_id, o.error) for o in engine.step() if o.error]
    assert errors == [("stuck", "the grammar did not compile in time")]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# ---- random schemas never crash the engine ---------------------------------------------------------------
_leaf = st.one_of(
    st.just({"type": "integer"}),
    st.just({"type": "boolean"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(
        lambda vals: {"enum": vals},
        st.lists(st.integers(-5, 5) | st.text("ab", max_size=3), min_size=1, max_size=3, unique=True),
    ),
    st.sampled_from(
        [
            {"type": "number", "minimum": "x"},
            {"type": "nope"},
            {"pattern": "(("},
            {"type": "string", "pattern": "^[0-9]{2}$"},
            {"type": "number", "multipleOf": 0.5},  # refused: the grammar would not enforce these
            {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
            {"not": {"type": "integer"}},
            {"type": "integer", "multipleOf": 3, "maximum": 9},
            {"type": "string", "minLength": 1, "maxLength": 20},
        ]
    ),
)
_schemas = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(
            lambda items, n: {"type": "array", "items": items, "maxItems": n}, inner, st.integers(0, 2)
        ),
        st.builds(
            lambda props: {"type": "object", "properties": props, "required": sorted(props)[:1]},
            st.dictionaries(st.text("pqr", min_size=1, max_size=2), inner, max_size=3),
        ),
    ),
    max_leaves=5,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schemas, grammar=st.text('root:="ab|*()[] \n', max_size=24))
def test_random_schemas_and_grammars_never_crash(tiny_engine_llm, schema, grammar):
    for kind in ({"json": schema}, {"grammar": grammar or "root ::= x"}):
        params = SamplingParams(max_tokens=32, temperature=0, structured_outputs=kind)
        try:
            [out] = tiny_engine_llm.generate(["{"], params, use_tqdm=False)
        except InvalidRequestError as e:
            assert e.field.startswith("structured_outputs"), e
            continue
        c = out.outputs[0]
        if "json" in kind and c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
    assert not tiny_engine_llm.engine.has_unfinished_requests()


@pytest.fixture(scope="module")
def tiny_engine_llm(tiny_with_tokenizer):
    return LLM(tiny_with_tokenizer, num_kv_blocks=64)


def test_the_batched_mask_fill_equals_the_row_by_row_one(smollm):
    """From BATCH_FILL_ROWS rows on, xgrammar's threads fill the masks: the same bits as one by one."""
    service = smollm.engine.grammar_service()
    states = service.grammars(StructuredOutputsParams(json=PERSON), 10)
    for state in states:
        state.compiled.result()
    texts = ['{"name": "Al', '{"name": "Bo", "age": 4', '{"name": "Cy", "age": 40, "role": "gu', "{", ""]
    for k, state in enumerate(states):  # each matcher in a state of its own
        for token in smollm.tokenizer(texts[k % len(texts)], add_special_tokens=False).input_ids:
            assert state.accept(token)
    width = smollm.engine.scheduler.bitmask_width
    batched, one_by_one = np.zeros((10, width), np.int32), np.zeros((10, width), np.int32)
    assert states[0].batch is not None
    fill_bitmasks(states, batched)
    for row, state in enumerate(states):
        state.fill_bitmask(one_by_one, row)
    assert np.array_equal(batched, one_by_one) and len({r.tobytes() for r in batched}) == len(texts)


def test_a_mask_filled_on_a_thread_equals_one_filled_where_read():
    from pagetron.backend.core.step import GrammarMask, MaskStats

    def fill(states, bitmask):
        for row, value in enumerate(states):
            if value is None:
                raise RuntimeError("no matcher")
            bitmask[row] = value

    stats = MaskStats()
    here, there = GrammarMask([0, 2], [5, -1], 3, fill, stats), GrammarMask([0, 2], [5, -1], 3, fill, stats)
    there.start_fill()
    assert np.array_equal(there.bitmask, here.bitmask) and here.bitmask.tolist() == [[5, 5, 5], [-1, -1, -1]]
    there.start_fill()  # filled already: nothing to do
    assert (stats.steps, stats.on_thread) == (2, 1)
    broken = GrammarMask([1], [None], 3, fill, stats)
    broken.start_fill()
    with pytest.raises(RuntimeError, match="no matcher"):
        broken.bitmask  # noqa: B018 (the read raises what the thread raised)


def test_a_model_padded_past_its_tokenizer_masks_over_the_tokenizers_ids(tmp_path):
    """A model of 49,152 + 96 ids with SmolLM2's tokenizer and 5 tokens added (49,157): grammars cover the
    tokenizer's ids rounded up to whole 32-id words (1,537 bitmask words, not 1,539), and no padding id is
    sampled under a grammar, even with the largest logit (logit_bias), while unconstrained it is: neither
    one past the words (49,200) nor one inside the last word (49,160), whose bits xgrammar sets inside a
    JSON string unless the id is in its vocabulary."""
    from transformers import AutoTokenizer

    model = make_hf_model(tmp_path / "padded", "llama", num_kv_heads=2, tie_word_embeddings=False,
                          vocab_size=49152 + 96, with_tokenizer=True)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens([f"<extra{i}>" for i in range(5)])
    tokenizer.save_pretrained(model)
    llm = LLM(str(model), kv_cache_memory_gb=0.05)
    assert (llm.engine.grammar_vocab_size, llm.engine.scheduler.bitmask_width) == (49184, 1537)
    constraints = (StructuredOutputsParams(regex=r"[ab]{3}"), StructuredOutputsParams(json_object=True))
    for padding in (49160, 49200):
        bias = {padding: 100.0}
        plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logit_bias=bias)
        assert llm.generate("Hi", plain, use_tqdm=False)[0].outputs[0].token_ids == [padding] * 4
        outs = []
        for so in constraints:
            params = SamplingParams(temperature=0, max_tokens=8, logit_bias=bias, structured_outputs=so)
            outs.append(llm.generate("Hi", params, use_tqdm=False)[0].outputs[0])
        assert [o.finish_reason for o in outs] == ["stop", "length"] and re.fullmatch("[ab]{3}", outs[0].text)
        assert all(padding not in o.token_ids for o in outs)


def test_filling_masks_on_a_thread_shortens_the_gil_switch_interval(tiny_with_tokenizer):
    """The fill thread takes the GIL back within half a millisecond of a busy engine thread, not 5 ms: an
    engine that fills on a thread shortens the process's switch interval with its first constrained
    request (never lengthens it); one that fills where the mask is read leaves it."""
    import sys

    from pagetron.backend.engine.llm_engine import GIL_SWITCH_INTERVAL_S

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        params = SamplingParams(max_tokens=4, temperature=0, structured_outputs={"regex": "(x|yy)+"})

        def engine(on_thread: bool) -> LLM:
            llm = LLM(tiny_with_tokenizer, num_kv_blocks=64, async_scheduling=True)
            llm.engine.fill_masks_on_thread = on_thread  # as on a host of 8+ cores, or not
            llm.generate(["a"], params, use_tqdm=False)
            return llm

        engine(False)
        assert sys.getswitchinterval() == 0.005  # fills where read: nothing changed
        llm = engine(True)
        assert llm.engine.scheduler.mask_stats.on_thread > 0
        assert sys.getswitchinterval() == GIL_SWITCH_INTERVAL_S
        sys.setswitchinterval(0.0001)
        engine(True)
        assert sys.getswitchinterval() == pytest.approx(0.0001)  # a shorter one stays
    finally:
        sys.setswitchinterval(before)


# ---- what xgrammar 0.2.8 compiles wrong, compiled right (GrammarService._parse, exact_json_ebnf) ---------
def accepts(smollm, constraint: dict, text: str | list[int]) -> bool:
    """Whether a fresh sequence under ``constraint`` takes every token of ``text`` (or these ids)."""
    [state] = smollm.engine.grammar_service().grammars(StructuredOutputsParams(**constraint), 1)
    state.compiled.result()
    ids = text if isinstance(text, list) else smollm.tokenizer.encode(text)
    return all(state.accept(token) for token in ids)


@pytest.mark.parametrize(
    ("constraint", "written"),
    [
        ({"json": {"enum": ["éa", True]}}, '"éa"'),
        ({"json": {"const": "ÿ0"}}, '"ÿ0"'),
        (
            {"json": {"type": "object", "properties": {"éa": {"type": "integer"}}, "required": ["éa"]}},
            '{"éa": 1}',
        ),
        ({"json": {"type": "string", "pattern": "^[éa]+$"}}, '"éa"'),
        ({"choice": ["éa", "b"]}, "éa"),
        ({"regex": "[éa]+"}, "éa"),
        ({"grammar": 'root ::= [éa]+ "x"'}, "éax"),
    ],
    ids=["enum", "const", "property", "pattern class", "choice", "regex class", "grammar class"],
)
def test_a_latin1_character_before_a_hex_digit_is_compiled_as_written(smollm, constraint, written):
    """xgrammar 0.2.8 prints U+0080-U+00FF as \\xHH when it compiles a Grammar object and reads back every
    hex digit after it: "éa" became U+0E9A ("ບ"), allowed in its place."""
    misread = written.replace("éa", "ບ").replace("ÿ0", "\u0ff0")
    assert accepts(smollm, constraint, written) and not accepts(smollm, constraint, misread)


def test_json_strings_take_no_raw_control_character_and_no_invalid_utf8(smollm):
    """Bounded (xgrammar's maxLength past the lengths written as patterns, and those), unbounded and any
    JSON: a raw tab, the bytes of a surrogate or an overlong form (one token per byte) are refused inside
    a string."""
    from test_detokenizer import gpt2_byte_to_unicode

    byte = gpt2_byte_to_unicode()
    surrogate = smollm.tokenizer.convert_tokens_to_ids([byte[b] for b in (0xED, 0xA0, 0x80)])
    overlong = smollm.tokenizer.convert_tokens_to_ids([byte[b] for b in (0xE0, 0x93, 0x99)])  # U+04D9
    quote = smollm.tokenizer.encode('"')
    for constraint, opening in [
        ({"json": {"type": "string", "maxLength": 200}}, quote),
        ({"json": {"type": "string", "maxLength": 20}}, quote),
        ({"json": {"type": "string"}}, quote),
        ({"json_object": True}, smollm.tokenizer.encode('{"a": "')),
    ]:
        assert accepts(smollm, constraint, opening + smollm.tokenizer.encode("é b"))
        assert not accepts(smollm, constraint, opening + smollm.tokenizer.encode("a\tb"))
        assert not accepts(smollm, constraint, opening + surrogate)
        assert not accepts(smollm, constraint, opening + overlong)


def test_exact_json_ebnf_rewrites_only_byte_escapes_and_string_classes():
    """Escapes anywhere; the classes only outside quoted literals (an enum value may print like one)."""
    from pagetron.backend.engine.grammar import exact_json_ebnf

    loose = r"[^\"\\\r\n]"
    ebnf = (
        f'a ::= (("\\xe9a" "\\\\x41" [\\xe9-\\xff])) (=([ \\n]))\nb ::= (({loose}))\nc ::= (("x\\"{loose}"))'
    )
    assert exact_json_ebnf(ebnf) == (
        'a ::= (("\\u00e9a" "\\\\x41" [\\u00e9-\\u00ff])) (=([ \\n]))\n'
        'b ::= (([^\\0-\\u001f\\"\\\\\\uD800-\\uDFFF]))\n'
        f'c ::= (("x\\"{loose}"))'
    )


@functools.cache
def token_lengths(tokenizer, vocab: int) -> np.ndarray:
    return np.array([len(tokenizer.decode([i])) for i in range(vocab)])


def walk(smollm, state, rng: np.random.Generator, max_steps: int = 300) -> list[int] | None:
    """Random allowed tokens (EOS half the time it is allowed, short tokens mostly, so strings end) until
    the grammar is complete: the ids, or None if it was not complete in ``max_steps``."""
    vocab = smollm.engine.grammar_vocab_size
    eos = smollm.tokenizer.eos_token_id
    lengths = token_lengths(smollm.tokenizer, vocab)
    bitmask = np.zeros((1, smollm.engine.scheduler.bitmask_width), np.int32)
    ids: list[int] = []
    for _ in range(max_steps):
        if state.is_terminated():
            return ids
        state.fill_bitmask(bitmask, 0)
        allowed = np.flatnonzero(np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")[:vocab])
        short = allowed[lengths[allowed] <= 2]
        if eos in allowed and rng.random() < 0.5:
            token = eos
        else:
            token = int(rng.choice(short if len(short) and rng.random() < 0.8 else allowed))
        assert state.accept(token), f"the mask allowed {token} but the matcher refused it"
        ids.append(token)
    return None


_walk_schemas = st.recursive(
    st.one_of(
        st.sampled_from([{"type": t} for t in ("integer", "number", "boolean", "null", "string")]),
        # written as patterns (up to 16 always, longer ones up to 128 by the shortest 8) and not (130)
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.sampled_from([0, 3, 16, 40, 130])),
        st.builds(
            lambda v: {"enum": v},
            st.lists(st.integers(-3, 3) | st.text("aé\"\\ÿ0", max_size=3), min_size=1, max_size=3,
                     unique=True),
        ),
        st.sampled_from([{"type": "string", "pattern": "^[a-zé]{2,4}$"}, {"type": "string", "format": "date"},
                         {"type": ["string", "null"]}, {"type": "integer", "minimum": -5, "maximum": 50}]),
    ),
    lambda inner: st.one_of(
        st.builds(lambda it, n: {"type": "array", "items": it, "maxItems": n}, inner, st.integers(0, 3)),
        st.builds(
            lambda props, ap: {"type": "object", "properties": props, "required": sorted(props)[:2],
                               "additionalProperties": ap},
            st.dictionaries(st.text("pqé", min_size=1, max_size=2), inner, max_size=3), st.booleans(),
        ),
        st.builds(lambda branches: {"anyOf": branches}, st.lists(inner, min_size=1, max_size=2)),
    ),
    max_leaves=5,
)  # fmt: skip


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_walk_schemas, seed=st.integers(0, 2**32 - 1))
def test_every_walk_a_schemas_grammar_completes_is_valid_json_of_that_schema(smollm, schema, seed):
    """What the grammar engine lets through, not what a model happens to pick: random walks over the
    allowed tokens of random schemas (non-ASCII literals, long and short bounded strings, nesting)."""
    try:
        states = smollm.engine.grammar_service().grammars(StructuredOutputsParams(json=schema), 2)
    except InvalidRequestError:
        return
    states[0].compiled.result()
    rng = np.random.default_rng(seed)
    for state in states:
        ids = walk(smollm, state, rng)
        if ids is not None:
            text = utf8_text(smollm.tokenizer, ids)  # raises on bytes that are not UTF-8
            jsonschema.validate(json.loads(text), schema)


def utf8_text(tokenizer, ids: list[int]) -> str:
    """The bytes of ``ids`` (SmolLM2's byte-level tokens; special tokens left out) decoded strictly."""
    from test_detokenizer import gpt2_byte_to_unicode

    to_byte = {char: b for b, char in gpt2_byte_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens([i for i in ids if i not in special])
    return bytes(to_byte[char] for piece in pieces for char in piece).decode("utf-8")
