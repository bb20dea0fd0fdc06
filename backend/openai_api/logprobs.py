"""The `llm` model's logprobs (per generated token: {token_id: {"logprob", "rank", "decoded_token"}}) in
OpenAI's two shapes: chat's ``content`` list and the completions API's parallel lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for -inf, which JSON cannot carry


def _top(step: dict[str, Any], k: int) -> list[tuple[str, float]]:
    ranked = sorted(step.values(), key=lambda e: (e["rank"], -e["logprob"]))[:k]
    return [(e.get("decoded_token") or "", _finite(e["logprob"])) for e in ranked]


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _sampled(step: dict[str, Any], token_id: int) -> tuple[str, float]:
    entry = step.get(str(token_id))
    if entry is None:  # the model always reports the sampled token; this guards a malformed response
        return "", LOGPROB_FLOOR
    return entry.get("decoded_token") or "", _finite(entry["logprob"])


def chat_logprobs(steps: Sequence[dict[str, Any]], token_ids: Sequence[int], k: int) -> list[dict[str, Any]]:
    """Chat's ``logprobs.content`` entries for these tokens, each with its ``k`` most likely tokens."""
    entries = []
    for step, token_id in zip(steps, token_ids):
        token, logprob = _sampled(step, token_id)
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in _top(step, k)]
        entries.append(
            {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top}
        )
    return entries


def completion_logprobs(
    steps: Sequence[dict[str, Any]], token_ids: Sequence[int], k: int, text_offset: int
) -> dict[str, list]:
    """The completions API's ``logprobs`` object; offsets count characters from ``text_offset``."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for step, token_id in zip(steps, token_ids):
        token, logprob = _sampled(step, token_id)
        tokens.append(token)
        token_logprobs.append(logprob)
        top_logprobs.append(dict(_top(step, k)))
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }
