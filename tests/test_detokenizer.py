import pytest

from model_factory import smollm2_tokenizer
from pagetron.backend.core.detokenizer import IncrementalDetokenizer, decode_full
from pagetron.backend.core.sampling_params import SamplingParams

IM_END = 2  # <|im_end|>, a special token of SmolLM2


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer()


def gpt2_byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the others to chars from U+0100 on."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_token_ids(tokenizer, data: bytes) -> list[int]:
    """One token per byte, so every multi-byte character is split across tokens."""
    alphabet = gpt2_byte_to_unicode()
    ids = tokenizer.convert_tokens_to_ids([alphabet[b] for b in data])
    assert tokenizer.unk_token_id not in ids
    return ids


def stream(detok: IncrementalDetokenizer, token_ids: list[int]) -> tuple[list[str], str | None]:
    """Feed tokens one by one; return all deltas (the last one flushed with finished=True) and the stop."""
    deltas = []
    stop = None
    for token_id in token_ids:
        stop = detok.update([token_id])
        deltas.append(detok.get_delta())
        if stop is not None:
            break
    deltas.append(detok.get_delta(finished=True))
    return deltas, stop


TEXTS = [
    "Hello, world! How are you today?",
    "héllo naïve café — Ünïcödé, façade, smörgåsbord",
    "😀 emoji 🤗🧑‍🚀 and a family 👨‍👩‍👧 👍🏽!",
    "日本語のテキスト、中文字符和한국어",
    "def f(x):\n    return x  # ok\n\n\tif a  and  b:\n\t\tpass\n",
    "Ωμέγα русский עברית العربية ∑∫√∞",
    "  leading spaces and trailing  ",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"])
def test_streamed_text_equals_full_decode(tokenizer, text, prompt):
    output_ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), SamplingParams())
    max_window = 0
    deltas = []
    for token_id in output_ids:
        detok.update([token_id])
        deltas.append(detok.get_delta())
        max_window = max(max_window, len(detok.token_ids) - detok.prefix_offset)
    deltas.append(detok.get_delta(finished=True))
    assert decode_full(tokenizer, output_ids) == text
    assert "".join(deltas) == text
    assert detok.output_text == text
    assert not any("\ufffd" in d for d in deltas)
    assert max_window <= 8  # the decode window stays small: O(1) work per token


@pytest.mark.parametrize("text", ["é😀世界", "a🧑‍🚀b", "€100 ≈ ¥15000", "𝄞 music"])
def test_one_token_per_byte(tokenizer, text):
    output_ids = byte_token_ids(tokenizer, text.encode())
    assert len(output_ids) == len(text.encode())
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, [], SamplingParams()), output_ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == text


def test_split_characters_appear_whole_on_their_last_byte(tokenizer):
    output_ids = byte_token_ids(tokenizer, "é😀世界".encode())
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, [], SamplingParams()), output_ids)
    assert deltas == ["", "é", "", "", "", "😀", "", "", "世", "", "", "界", ""]


def test_invalid_bytes_in_the_middle_are_emitted(tokenizer):
    output_ids = tokenizer.encode("ok ") + byte_token_ids(tokenizer, b"\xf0\x9f") + tokenizer.encode(" fine")
    expected = decode_full(tokenizer, output_ids)
    assert expected == "ok \ufffd fine"
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, [], SamplingParams()), output_ids)
    assert "".join(deltas) == expected


def test_incomplete_character_at_the_end_is_flushed_when_finished(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    detok.update(tokenizer.encode("abc"))
    detok.update(byte_token_ids(tokenizer, b"\xe4\xb8"))  # first two bytes of 世
    assert detok.output_text == "abc"
    assert detok.get_delta() == "abc"
    assert detok.get_delta(finished=True) == decode_full(tokenizer, byte_token_ids(tokenizer, b"\xe4\xb8"))
    assert detok.output_text == decode_full(
        tokenizer, tokenizer.encode("abc") + byte_token_ids(tokenizer, b"\xe4\xb8")
    )


def test_character_completed_later_is_emitted_whole(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    assert detok.update(byte_token_ids(tokenizer, b"\xe4")) is None
    assert detok.get_delta() == ""
    detok.update(byte_token_ids(tokenizer, b"\xb8"))
    assert detok.get_delta() == ""
    detok.update(byte_token_ids(tokenizer, b"\x96"))
    assert detok.get_delta() == "世"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer, skip):
    output_ids = [*tokenizer.encode("Hi there"), IM_END, *tokenizer.encode(" more")]
    deltas, _ = stream(
        IncrementalDetokenizer(tokenizer, [1], SamplingParams(skip_special_tokens=skip)), output_ids
    )
    expected = "Hi there more" if skip else "Hi there<|im_end|> more"
    assert decode_full(tokenizer, output_ids, skip_special_tokens=skip) == expected
    assert "".join(deltas) == expected


def test_multiple_tokens_per_update(tokenizer):
    text = TEXTS[2]
    output_ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    deltas = []
    for i in range(0, len(output_ids), 3):
        detok.update(output_ids[i : i + 3])
        deltas.append(detok.get_delta())
    deltas.append(detok.get_delta(finished=True))
    assert "".join(deltas) == text


def test_update_with_no_tokens(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    assert detok.update([]) is None
    assert detok.output_text == "" and detok.get_delta(finished=True) == ""


# ---- stop strings

ANSWER = "The answer is 42.\n\nNext question"  # tokens: The| answer| is| |4|2|.|\n|\n|Next| question


@pytest.mark.parametrize(
    ("stop", "include", "expected_text", "stop_token_index"),
    [
        (["\n\nNext"], False, "The answer is 42.", 9),  # spans the tokens \n, \n and Next
        (["\n\nNext"], True, "The answer is 42.\n\nNext", 9),
        (["42"], False, "The answer is ", 5),
        (["swer i"], False, "The an", 2),  # starts inside a token, ends inside the next one
        (["swer i"], True, "The answer i", 2),
        (["question", "is 4"], False, "The answer ", 4),  # the first to appear wins, not the first listed
        (["nothing like this"], False, ANSWER, None),
    ],
)
def test_stop_strings(tokenizer, stop, include, expected_text, stop_token_index):
    output_ids = tokenizer.encode(ANSWER)
    params = SamplingParams(stop=stop, include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    matched_at = None
    for i, token_id in enumerate(output_ids):
        if detok.update([token_id]) is not None:
            matched_at = i
            break
    assert matched_at == stop_token_index
    assert detok.output_text == expected_text
    if stop_token_index is not None:
        assert detok.stop_string in stop and detok.stopped
        assert detok.update(tokenizer.encode(" ignored")) is None  # later calls are ignored
        assert detok.output_text == expected_text


@pytest.mark.parametrize(("include", "last_deltas"), [(False, ["", ""]), (True, ["STOP!", ""])])
def test_streamed_deltas_never_leak_a_stop_string(tokenizer, include, last_deltas):
    text = "Hello world, this is a test STOP! after"  # ... test| ST|OP|!| after
    params = SamplingParams(stop=["STOP!"], include_stop_str_in_output=include)
    deltas, stop = stream(IncrementalDetokenizer(tokenizer, [], params), tokenizer.encode(text))
    assert stop == "STOP!"
    # 4 chars (len("STOP!") - 1) are withheld while streaming, so "ST" and "STOP" are never sent early
    assert deltas == ["H", "ello w", "o", "rld, ", "thi", "s ", "is a ", "tes", "t ", *last_deltas]


def test_stop_not_checked_before_min_tokens(tokenizer):
    output_ids = tokenizer.encode("a b a b a b")  # a| b| a| b| a| b
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["b"], min_tokens=3))
    results = [detok.update([token_id]) for token_id in output_ids[:4]]
    # token 3 (" a") reaches min_tokens but adds no "b"; earlier "b"s are not matched retroactively
    assert results == [None, None, None, "b"]
    assert detok.output_text == "a b a "


def test_get_delta_withholds_then_flushes(tokenizer):
    output_ids = tokenizer.encode("Hello world")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["xyz12", "q"]))
    detok.update(output_ids[:1])
    assert detok.get_delta() == "H"  # "Hello" minus the 4 chars that could start "xyz12"
    detok.update(output_ids[1:])
    assert detok.get_delta() == "ello w"
    assert detok.get_delta() == ""
    assert detok.get_delta(finished=True) == "orld"
    assert detok.get_delta(finished=True) == ""


def test_get_delta_without_stop_strings_streams_everything(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    detok.update(tokenizer.encode("Hello"))
    assert detok.get_delta() == "Hello"


def test_decode_full(tokenizer):
    ids = [1, *tokenizer.encode("a . b ?  don 't"), IM_END]
    assert decode_full(tokenizer, ids) == "a . b ?  don 't"  # no clean-up of spaces
    assert decode_full(tokenizer, ids, skip_special_tokens=False) == "<|im_start|>a . b ?  don 't<|im_end|>"


@pytest.mark.parametrize(("include", "expected"), [(False, "Hi there"), (True, "Hi there again")])
def test_stop_terminated_leaves_out_the_stop_token_text(tokenizer, include, expected):
    """A stop token id (here the normal token " again") ends the sequence: its text is dropped, as in vLLM."""
    hi_there, again = tokenizer.encode("Hi there"), tokenizer.encode(" again")
    assert len(again) == 1
    params = SamplingParams(stop_token_ids=again, include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    detok.update(hi_there)
    assert detok.update(again, stop_terminated=True) is None
    assert detok.get_delta(finished=True) == expected
    assert detok.num_output_tokens == len(hi_there) + 1


@pytest.mark.parametrize("prompt", ["x", "Hi", "a much longer prompt with many tokens in it"])
def test_prompt_context_of_any_length(tokenizer, prompt):
    text = " world 🌍"
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), SamplingParams())
    deltas, _ = stream(detok, tokenizer.encode(text))
    assert "".join(deltas) == text
    assert len(detok.token_ids) <= 5 + len(tokenizer.encode(text))  # only the prompt's tail is kept


def test_stop_string_completed_by_a_final_partial_character_is_caught_on_finish(tokenizer):
    # " \xf0" (id 459) completes "Hello " but starts a 4-byte character that never completes
    params = SamplingParams(stop=["Hello "])
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:", add_special_tokens=False), params)
    assert detok.update(tokenizer.encode("Hello", add_special_tokens=False)) is None
    assert detok.update([459]) is None  # held back: the tail is an incomplete character
    assert detok.update([], finished=True) == "Hello "
    assert detok.stop_string == "Hello " and detok.output_text == ""
    assert detok.get_delta(finished=True) == ""


def test_the_rust_backend_decodes_where_the_python_wrapper_adds_nothing(tokenizer):
    """A fast tokenizer's backend is called directly (the wrapper costs more than the decode), unless its
    class decodes in a way of its own."""
    import copy

    from pagetron.backend.core.detokenizer import backend_decoder

    assert backend_decoder(tokenizer) is tokenizer.backend_tokenizer

    class OwnDecode(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return "x" * len(token_ids)

    class OwnPublicDecode(type(tokenizer)):
        def decode(self, token_ids, **kwargs):
            return "x" * len(token_ids)

    own = copy.copy(tokenizer)
    own.__class__ = OwnPublicDecode
    assert backend_decoder(own) is None
    own.__class__ = OwnDecode
    assert backend_decoder(own) is None
    detok = IncrementalDetokenizer(own, [], SamplingParams())
    detok.update(tokenizer.encode("Hello, world"))
    assert detok.get_delta(finished=True) == "xxx"
