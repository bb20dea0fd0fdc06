"""Torch reference implementations of the paged-attention operations.

They define the semantics the GPU kernels must match, and they are the CPU path of the engine.
KV cache layout (one layer): ``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t`` of a
sequence lives in block ``block_table[t // block_size]`` at offset ``t % block_size``.

fp8 KV cache. The caches are either of the query's dtype, or both ``torch.float8_e4m3fn`` (Triton's
``tl.float8e4nv``) while q/k/v stay bf16, fp16 or fp32; each layer then has two Python-float scales,
``k_scale`` and ``v_scale`` (1.0 without calibration, as in vLLM). Non-fp8 caches take only scales of 1.0.
- Writing stores ``e4m3(clamp(x * (1 / scale), -448, 448))``: ``1 / scale`` is rounded to fp32 once (on
  the host) and multiplies ``x`` in fp32; e4m3 rounds to nearest, ties to even. The clamp keeps values
  past e4m3fn's largest finite value (448; it has no inf) from turning into NaN; a NaN stays NaN. The
  reciprocal rather than a division so that every implementation rounds alike (torch's CUDA division by a
  scalar multiplies by the reciprocal too); it equals ``x / scale`` whenever ``scale`` is a power of two.
- Reading dequantizes ``cache.to(float32) * scale``, rounds that to the query's dtype and attends as with
  a cache of that dtype.
The kernels fold the scales instead: they feed the stored e4m3 values, converted to the query's dtype
(exact: every e4m3 value is a bf16 and an fp16 value), to ``tl.dot``, multiply the scores by
``scale * k_scale`` and the output by ``v_scale``. That is the same in exact arithmetic; in floating point
it differs by the rounding of the dequantized values to the query's dtype (none when the scales are powers
of two, as the default 1.0) and of the folded products, far below the e4m3 rounding itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def check_kv_scales(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: float, v_scale: float) -> bool:
    """Whether the caches are fp8; scales must be positive Python numbers there, and 1.0 elsewhere."""
    assert k_cache.dtype == v_cache.dtype, f"k_cache {k_cache.dtype} and v_cache {v_cache.dtype} differ"
    assert isinstance(k_scale, (int, float)) and isinstance(v_scale, (int, float)), (
        "k_scale and v_scale must be Python floats (a tensor would sync the host)"
    )
    if k_cache.dtype != FP8_DTYPE:
        assert k_scale == 1.0 and v_scale == 1.0, (
            f"k_scale / v_scale apply to fp8 caches only; got {k_scale}, {v_scale} with {k_cache.dtype}"
        )
        return False
    assert 0 < k_scale < math.inf and 0 < v_scale < math.inf, f"bad scales {k_scale}, {v_scale}"
    return True


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` as the e4m3 values an fp8 cache stores for it (see the module docstring)."""
    return (x.float() * (1.0 / scale)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_kv(cache: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cached K or V in ``dtype``: fp8 entries times ``scale``; other caches as they are."""
    if cache.dtype != FP8_DTYPE:
        return cache
    return (cache.float() * scale).to(dtype)


def write_kv_cache_ref(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, slot = block * block_size + offset; -1 = skip (padding)
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    if fp8:
        key, value = quantize_fp8(key, k_scale), quantize_fp8(value, v_scale)
        # index_copy_ has no fp8 kernel (on the CPU at least): copy the bytes
        key, value, k_cache, v_cache = (t.view(torch.uint8) for t in (key, value, k_cache, v_cache))
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)


def gather_kv_ref(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first ``num_tokens`` cached entries of one sequence as ``[num_tokens, Hkv, D]``."""
    block_size = cache.shape[1]
    num_blocks = -(-num_tokens // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:num_tokens]


def paged_decode_attention_ref(
    query: torch.Tensor,  # [B, Hq, D], one new token per sequence (its K/V already written)
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32, rows padded with any valid block id
    context_lens: torch.Tensor,  # [B] int32, tokens in the cache including the new one
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    batch, num_heads, head_dim = query.shape
    block_size = k_cache.shape[1]
    max_blocks = block_tables.shape[1]
    tables = block_tables.long()
    keys = dequantize_kv(k_cache[tables].flatten(1, 2), k_scale, query.dtype)  # [B, L, Hkv, D]
    values = dequantize_kv(v_cache[tables].flatten(1, 2), v_scale, query.dtype)
    positions = torch.arange(max_blocks * block_size, device=query.device)
    mask = positions[None, :] < context_lens[:, None].long()  # [B, L]
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2),  # [B, Hq, 1, D]
        keys.transpose(1, 2),  # [B, Hkv, L, D]
        values.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=keys.shape[2] != num_heads,
    )
    return out.squeeze(2)


def paged_prefill_attention_ref(
    query: torch.Tensor,  # [T, Hq, D], the new tokens of all sequences, flattened
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    query_start_loc: list[int],  # [S + 1] offsets of each sequence's new tokens in ``query``
    seq_lens: list[int],  # [S] cached context per sequence, including the new tokens
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of new tokens over their whole context (cached prefix + themselves)."""
    check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    out = torch.empty_like(query)
    num_heads = query.shape[1]
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        keys = dequantize_kv(gather_kv_ref(k_cache, block_tables[i], seq_len), k_scale, query.dtype)
        values = dequantize_kv(gather_kv_ref(v_cache, block_tables[i], seq_len), v_scale, query.dtype)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            query[start:end].transpose(0, 1),  # [Hq, q_len, D]
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
            enable_gqa=keys.shape[1] != num_heads,
        )
        out[start:end] = o.transpose(0, 1)
    return out
