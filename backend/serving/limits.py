"""How large one request may be, derived from max_model_len: one place for the HTTP guard, the OpenAI
frontend and the model's own cheap refusals.

A valid prompt has fewer than max_model_len tokens, and no token is longer than the tokenizer's longest
vocabulary entry (81 UTF-8 bytes for SmolLM2), so a prompt of more bytes than max_model_len times that
length (times a margin for normalizers) cannot fit and is refused before it is tokenized. Request
bodies carry more than the prompt (JSON escaping, sampling parameters, a chat's roles), so their limit
leaves room: BYTES_PER_TOKEN per token of context plus a fixed allowance.
"""

from __future__ import annotations

BYTES_PER_TOKEN = 128  # body bytes a valid request may spend per token of context
FIXED_ALLOWANCE = 1 << 20  # for everything that is not the prompt


def request_body_limit(max_model_len: int) -> int:
    """The default limit on a request body's size, in bytes (a setting; this is its default)."""
    return FIXED_ALLOWANCE + BYTES_PER_TOKEN * max_model_len


NORMALIZER_MARGIN = 2  # a tokenizer's normalizer may shorten text (Unicode composition) before BPE


def prompt_cannot_fit(num_bytes: int, max_model_len: int, max_token_bytes: int) -> bool:
    """True when a prompt of ``num_bytes`` UTF-8 bytes must have at least max_model_len tokens."""
    return num_bytes > NORMALIZER_MARGIN * (max_model_len - 1) * max_token_bytes
