"""Decoding `llm` responses: one GenerationChunk per streamed response, GenerationResult for the whole."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FINAL_RESPONSE_PARAM = "triton_final_response"


@dataclass(frozen=True)
class GenerationChunk:
    """What one response carries; per-output tuples have one entry per output sequence (n of them).

    token_ids holds every output's new ids concatenated in index order (the output_ids tensor);
    num_output_tokens says how many belong to each output (None when the server did not send it).
    """

    texts: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()
    num_output_tokens: tuple[int, ...] | None = None
    finish_reasons: tuple[str | None, ...] = ()
    num_input_tokens: int | None = None
    cumulative_logprobs: tuple[float, ...] | None = None
    logprobs: tuple[Any, ...] | None = None
    final: bool = False

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[0] if self.finish_reasons else None

    @property
    def num_tokens(self) -> int:
        """New tokens in this response, all outputs together."""
        if self.num_output_tokens is not None:
            return sum(self.num_output_tokens)
        return len(self.token_ids)

    @property
    def has_content(self) -> bool:
        return bool(self.token_ids or any(self.texts) or any(self.finish_reasons) or self.num_tokens)

    def token_ids_by_output(self) -> list[list[int]]:
        """token_ids split per output; without num_output_tokens everything goes to output 0."""
        counts = self.num_output_tokens
        if counts is None or sum(counts) != len(self.token_ids):
            return [list(self.token_ids)]
        split, start = [], 0
        for count in counts:
            split.append(list(self.token_ids[start : start + count]))
            start += count
        return split


def parse_result(result: Any) -> GenerationChunk:
    """A tritonclient.grpc InferResult -> GenerationChunk. Outputs the server did not send stay empty."""
    num_input = _numbers(result.as_numpy("num_input_tokens"), int)
    logprobs = result.as_numpy("logprobs")
    return GenerationChunk(
        texts=tuple(_strings(result.as_numpy("text_output"))),
        token_ids=_numbers(result.as_numpy("output_ids"), int) or (),
        num_output_tokens=_numbers(result.as_numpy("num_output_tokens"), int),
        finish_reasons=tuple(_finish_reason(r) for r in _strings(result.as_numpy("finish_reason"))),
        num_input_tokens=num_input[0] if num_input else None,
        cumulative_logprobs=_numbers(result.as_numpy("cumulative_logprob"), float),
        logprobs=tuple(json.loads(s) for s in _strings(logprobs)) if logprobs is not None else None,
        final=is_final(result),
    )


def is_final(result: Any) -> bool:
    params = result.get_response().parameters
    return FINAL_RESPONSE_PARAM in params and params[FINAL_RESPONSE_PARAM].bool_param


def _strings(array: np.ndarray | None) -> list[str]:
    if array is None:
        return []
    values = array.reshape(-1)
    return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in values]


def _numbers(array: np.ndarray | None, kind: type) -> tuple | None:
    return None if array is None else tuple(kind(v) for v in array.reshape(-1))


def _finish_reason(reason: str) -> str | None:
    """Responses of unfinished sequences carry "" (or "None", as Triton's vLLM backend sends)."""
    return None if reason in ("", "None", "null") else reason


@dataclass
class GenerationResult:
    """Chunks of one request folded together (texts, ids and token counts summed per output)."""

    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    num_output_tokens: list[int] = field(default_factory=list)
    num_input_tokens: int | None = None
    cumulative_logprobs: list[float] | None = None
    logprobs: list[list[Any]] | None = None
    num_responses: int = 0

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    @property
    def finish_reason(self) -> str | None:
        return self.finish_reasons[0] if self.finish_reasons else None

    def add(self, chunk: GenerationChunk) -> None:
        self.num_responses += 1
        per_output_ids = chunk.token_ids_by_output()
        counts = chunk.num_output_tokens or [len(ids) for ids in per_output_ids]
        self._grow(max(len(chunk.texts), len(chunk.finish_reasons), len(counts), len(per_output_ids)))
        for i, text in enumerate(chunk.texts):
            self.texts[i] += text
        for i, ids in enumerate(per_output_ids):
            self.token_ids[i].extend(ids)
        for i, count in enumerate(counts):
            self.num_output_tokens[i] += count
        for i, reason in enumerate(chunk.finish_reasons):
            self.finish_reasons[i] = reason or self.finish_reasons[i]
        if chunk.num_input_tokens is not None:
            self.num_input_tokens = chunk.num_input_tokens
        if chunk.cumulative_logprobs is not None:
            self.cumulative_logprobs = list(chunk.cumulative_logprobs)
        if chunk.logprobs is not None:
            self.logprobs = self.logprobs or []
            self.logprobs.extend([] for _ in range(len(chunk.logprobs) - len(self.logprobs)))
            for i, entry in enumerate(chunk.logprobs):
                self.logprobs[i].extend(entry if isinstance(entry, list) else [entry])

    def _grow(self, n: int) -> None:
        while len(self.texts) < n:
            self.texts.append("")
            self.token_ids.append([])
            self.finish_reasons.append(None)
            self.num_output_tokens.append(0)
