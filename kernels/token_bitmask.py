"""OpenAI-Triton kernel applying grammar token bitmasks to logits in one launch (constrained decoding).

What it computes is token_bitmask_ref.apply_token_bitmask_ref: -inf on every token whose bit is clear,
and on every token past the bitmask's words (a grammar over a tokenizer smaller than the model's padded
vocabulary).
One program per (bitmask row, block of BLOCK tokens); it reads BLOCK / 32 words and writes only the
forbidden logits, so a row that allows most tokens costs little more than reading its words. Sizes come
from tensor shapes (no host sync); the logits row of each bitmask row is read on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # tokens per program: 128 words


@triton.jit
def _apply_token_bitmask_kernel(
    logits_ptr, words_ptr, rows_ptr, stride_logits, stride_words, vocab_size, num_words,
    HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + r).to(tl.int64)
    else:
        row = r.to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab_size
    in_words = in_vocab & (tokens // 32 < num_words)  # past the words: forbidden (other=0)
    words = tl.load(words_ptr + r.to(tl.int64) * stride_words + tokens // 32, mask=in_words, other=0)
    allowed = ((words >> (tokens % 32)) & 1) != 0
    tl.store(logits_ptr + row * stride_logits + tokens, float("-inf"), mask=in_vocab & ~allowed)


def apply_token_bitmask(logits: torch.Tensor, words: torch.Tensor, rows: torch.Tensor | None) -> None:
    """In place: logits [N, V] (the last dim contiguous); words int32 [R, W] on the logits' device (tokens
    from 32 W on are forbidden); rows: int [R] logits row of each bitmask row, or None when bitmask row r
    is logits row r."""
    vocab_size = logits.shape[1]
    assert words.dtype == torch.int32, words.dtype
    assert logits.stride(1) == 1 and words.stride(1) == 1, "rows must be contiguous"
    if rows is None:
        assert words.shape[0] == logits.shape[0], (words.shape, logits.shape)
    if words.shape[0] == 0:
        return
    grid = (words.shape[0], triton.cdiv(vocab_size, BLOCK))
    _apply_token_bitmask_kernel[grid](
        logits, words, words if rows is None else rows, logits.stride(0), words.stride(0), vocab_size,
        words.shape[1], HAS_ROWS=rows is not None, BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
