"""Torch reference for applying grammar token bitmasks to logits (the CPU path of the sampler, and what
the OpenAI-Triton kernel in token_bitmask.py computes).

Bit ``j`` of int32 word ``w`` in a bitmask row allows token ``32 * w + j``; a cleared bit sets that
token's logit to -inf::

    words[r]      = [ w0                 | w1                  | ... ]   int32, ceil(V / 32) of them
    tokens        =   0 1 2 ... 31         32 33 ... 63
    logits[rows[r], t] = -inf  where  (words[r][t // 32] >> (t % 32)) & 1 == 0, or t >= 32 W

Words may stop short of the vocabulary (a grammar over a tokenizer smaller than the model's padded
vocabulary, W < ceil(V / 32)): the tokens past them are forbidden.
"""

from __future__ import annotations

import torch

_BITS: dict[torch.device, torch.Tensor] = {}  # device -> int32 [32] of 1 << j


def apply_token_bitmask_ref(logits: torch.Tensor, words: torch.Tensor, rows: torch.Tensor | None) -> None:
    """In place: logits [N, V]; words int32 [R, W] (tokens from 32 W on are forbidden); rows: the logits
    row of each bitmask row (int [R]), or None when bitmask row r is logits row r (R == N)."""
    vocab_size = logits.shape[1]
    assert words.dtype == torch.int32, words.dtype
    short = -(-vocab_size // 32) - words.shape[1]
    if short > 0:
        words = torch.nn.functional.pad(words, (0, short))  # zero words: nothing allowed
    bits = _BITS.get(words.device)
    if bits is None:
        bits = _BITS[words.device] = torch.tensor(
            [1 << j for j in range(31)] + [-(1 << 31)], dtype=torch.int32, device=words.device
        )
    forbidden = (words[:, :, None] & bits).eq(0).flatten(1)[:, :vocab_size]
    if rows is None:
        assert words.shape[0] == logits.shape[0], (words.shape, logits.shape)
        logits.masked_fill_(forbidden, float("-inf"))
    else:
        logits[rows] = logits[rows].masked_fill(forbidden, float("-inf"))
