"""Incremental detokenization of a sequence's output tokens, with stop-string detection.

Each update decodes only a short window of tokens: those from ``prefix_offset`` (a few tokens of already
emitted context, so that tokenizers which strip or merge at the window start decode consistently) to the
end. The text of ``[prefix_offset, read_offset)`` was already emitted, so the new text is the suffix of the
window's decode past it. While that decode ends in U+FFFD the last token(s) hold only part of a UTF-8
character (byte-level BPE splits emoji and CJK this way), so nothing is emitted until it completes.
"""

from __future__ import annotations

import functools
from typing import Any

from pagetron.backend.core.sampling_params import SamplingParams

# Prompt tokens decoded as context before the first output token (vLLM uses the same number).
_INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def decode_full(tokenizer: Any, token_ids: list[int], skip_special_tokens: bool = True) -> str:
    """Decode a whole id list in one go, the reference the incremental text must equal."""
    return tokenizer.decode(
        token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


# NOTE: a fast tokenizer's decode is its Rust backend's, wrapped in Python that converts the ids, looks up
# the clean-up setting and so on: 3.3 us a call against 0.9 us for the backend alone (SmolLM2, a 6-token
# window). The detokenizer decodes twice per token of every running sequence, so where the wrapper adds
# nothing (clean-up off, neither decode nor _decode overridden) it calls the backend directly.
def backend_decoder(tokenizer: Any) -> Any:
    """The Rust tokenizer whose ``decode(ids, skip_special_tokens=...)`` equals ``decode_full``, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None and _decodes_plainly(type(tokenizer)) else None


@functools.cache
def _decodes_plainly(cls: type) -> bool:
    """Whether the class decodes as transformers' fast tokenizers do: ``decode`` and ``_decode`` both
    transformers' own (found by name: core does not import transformers)."""
    return _owner(cls, "decode") in ("PreTrainedTokenizerBase", *_FAST) and _owner(cls, "_decode") in _FAST


_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")  # transformers 5's fast tokenizer class, and 4's


def _owner(cls: type, name: str) -> str | None:
    """The name of the transformers class that defines ``name`` for ``cls``, or None if another does."""
    owner = next((c for c in cls.__mro__ if name in vars(c)), None)
    return owner.__name__ if owner is not None and owner.__module__.startswith("transformers.") else None


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self._backend = backend_decoder(tokenizer)
        # only the prompt's tail matters: it is the decode context of the first output tokens
        self.token_ids = list(prompt_token_ids[max(len(prompt_token_ids) - _INITIAL_CONTEXT_TOKENS, 0) :])
        self.num_output_tokens = 0
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.stop_strings = list(params.stop or ())
        # a partial stop string is at most this long, so get_delta never streams one before it is ruled out
        self._stop_holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self.stop_string: str | None = None  # the stop string that ended the text, once one matched
        self._text = ""
        self._num_returned_chars = 0

    @property
    def output_text(self) -> str:
        return self._text

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def update(
        self, new_token_ids: list[int], stop_terminated: bool = False, finished: bool = False
    ) -> str | None:
        """Append tokens; return the stop string if the text now contains one (the text is truncated at it).
        Calls after a stop string matched are ignored.

        ``stop_terminated``: the last token ended the sequence as EOS or a stop token id; as in vLLM its text
        is left out unless ``include_stop_str_in_output``. ``finished``: no token follows, so text held back
        as an incomplete character is flushed now (and checked for stop strings)."""
        if self.stopped:
            return None
        self.num_output_tokens += len(new_token_ids)
        if stop_terminated and not self.params.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        self.token_ids.extend(new_token_ids)
        new_text = self._decode_new_text(flush=finished)
        if not new_text:
            return None
        start = len(self._text)
        self._text += new_text
        if self.stop_strings and self.num_output_tokens >= self.params.min_tokens:
            self._check_stop_strings(start)
        return self.stop_string

    def get_delta(self, finished: bool = False) -> str:
        """Text not returned before. Until finished (or stopped) the last characters that could begin a stop
        string are withheld; ``finished=True`` also flushes tokens held back as an incomplete character."""
        if finished and not self.stopped and self.read_offset < len(self.token_ids):
            self._text += self._decode_window()[len(self._decode_prefix()) :]
            self.prefix_offset = self.read_offset = len(self.token_ids)
        end = len(self._text)
        if not (finished or self.stopped):
            end = max(self._num_returned_chars, end - self._stop_holdback)
        delta = self._text[self._num_returned_chars : end]
        self._num_returned_chars = end
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(token_ids, skip_special_tokens=self.params.skip_special_tokens)
        return decode_full(self.tokenizer, token_ids, self.params.skip_special_tokens)

    def _decode_prefix(self) -> str:
        return self._decode(self.token_ids[self.prefix_offset : self.read_offset])

    def _decode_window(self) -> str:
        return self._decode(self.token_ids[self.prefix_offset :])

    def _decode_new_text(self, flush: bool = False) -> str:
        if self.read_offset >= len(self.token_ids):
            return ""
        prefix_text = self._decode_prefix()
        window_text = self._decode_window()
        waiting = len(window_text) <= len(prefix_text) or window_text.endswith(_REPLACEMENT_CHAR)
        if waiting and not flush:
            return ""  # no visible text yet, or the tail is an incomplete character: wait for more tokens
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return window_text[len(prefix_text) :]

    def _check_stop_strings(self, new_text_start: int) -> None:
        """Find the earliest stop string that overlaps the text added at ``new_text_start``."""
        best: tuple[int, str] | None = None
        for stop in self.stop_strings:
            index = self._text.find(stop, max(new_text_start - len(stop) + 1, 0))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return
        index, stop = best
        end = index + len(stop) if self.params.include_stop_str_in_output else index
        self._text = self._text[:end]
        self.stop_string = stop
