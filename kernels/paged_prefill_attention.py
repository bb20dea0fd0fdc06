"""Prefill / extend attention over the paged KV cache, in OpenAI Triton.

The new tokens of each sequence attend causally to the sequence's whole context: the cached prefix
(prefix-cache hits, earlier chunks of a chunked prefill) and themselves. Every K/V, the new tokens' too,
is read from the cache through the block table, so the caller writes the new K/V into the cache first.
Semantics: ``paged_prefill_attention_ref`` in ``attention_ref.py``.

Flash-attention style: one program per (query tile, sequence, KV head); the rows of a query tile are
``BLOCK_M // GROUP_PAD`` tokens times the ``GROUP_PAD`` query heads that share the KV head, so each K/V
tile is loaded once for the whole GQA group. Online softmax in base 2 with fp32 accumulation; key tiles
that every row sees in full run without masks, and key tiles wholly above the diagonal are never visited.

fp8 caches (``attention_ref``'s docstring): each e4m3 K/V tile is converted to the query's dtype (exactly)
for its ``tl.dot``; ``k_scale`` is folded into the softmax scale on the host and ``v_scale`` multiplies the
accumulator once at the end. Other caches compile without any of that.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pagetron.kernels.attention_ref import check_kv_scales

# head_dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages); picked for Hopper, not yet tuned on the H200.
TILE_CONFIGS: dict[int, tuple[int, int, int, int]] = {
    64: (128, 64, 4, 3),
    128: (128, 64, 8, 3),
}
# fp8 caches: the e4m3 -> bf16 conversions favour 4 warps (H200, 8 sequences of 1024 new tokens over
# 1024 cached, D=128: 13B 1.30 -> 0.96 ms, 8B 0.97 -> 0.73 ms; the bf16 kernel takes 0.94 and 0.68 ms)
FP8_TILE_CONFIGS: dict[int, tuple[int, int, int, int]] = {
    64: (128, 64, 4, 3),
    128: (128, 64, 4, 3),
}


@triton.jit
def _attend_key_range(
    acc, m_i, l_i, q, q_pos,
    k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
    key_begin, key_end, qk_scale,
    stride_kv_block, stride_kv_slot,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,
):  # fmt: skip
    """Folds keys [key_begin, key_end) into the running softmax state (acc, m_i, l_i).

    MASKED=False is only for keys that every row of the tile may see; MASKED=True applies the causal mask
    and guards the loads of keys at or past ``key_end`` (the last tile is partial).
    """
    dims = tl.arange(0, HEAD_DIM)
    for tile_start in range(key_begin, key_end, BLOCK_N):
        keys = tile_start + tl.arange(0, BLOCK_N)
        if MASKED:
            key_valid = keys < key_end
            block = tl.load(block_table_ptr + keys // BLOCK_SIZE, mask=key_valid, other=0)
        else:
            block = tl.load(block_table_ptr + keys // BLOCK_SIZE)
        # int64: a large cache holds more than 2**31 elements
        slot = block.to(tl.int64) * stride_kv_block + (keys % BLOCK_SIZE) * stride_kv_slot + kv_head_offset
        kv_offsets = slot[:, None] + dims[None, :]
        if MASKED:
            k = tl.load(k_cache_ptr + kv_offsets, mask=key_valid[:, None], other=0.0)
        else:
            k = tl.load(k_cache_ptr + kv_offsets)
        if KV_FP8:  # exact; k_scale is in qk_scale
            k = k.to(q.dtype)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASKED:
            scores = tl.where(keys[None, :] <= q_pos[:, None], scores, float("-inf"))
        # Key 0 is in the first tile and every row sees it, so m_new is finite from the first tile on.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        # V must be zeroed past key_end (not just weighted by p = 0): 0 * NaN from a stale slot is NaN.
        if MASKED:
            v = tl.load(v_cache_ptr + kv_offsets, mask=key_valid[:, None], other=0.0)
        else:
            v = tl.load(v_cache_ptr + kv_offsets)
        if KV_FP8:  # exact; the caller multiplies acc by v_scale
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# The block-table row stride changes with the longest context of each step: not a specialization key.
@triton.jit(do_not_specialize=["stride_table_seq"])
def _paged_prefill_attention_kernel(
    query_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    qk_scale,  # softmax scale * k_scale * log2(e)
    v_scale,
    stride_q_token, stride_q_head,
    stride_out_token, stride_out_head,
    stride_kv_block, stride_kv_slot, stride_kv_head,
    stride_table_seq,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    BLOCK_M: tl.constexpr,  # rows per query tile
    BLOCK_N: tl.constexpr,  # keys per key tile
    DOT_PRECISION: tl.constexpr,
    KV_FP8: tl.constexpr,  # float8e4nv caches
):  # fmt: skip
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP_PAD  # query tokens per tile
    # Later query tiles see more keys; handing them out first shortens the tail of the launch.
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    first_token = q_tile * BLOCK_Q  # counted among the sequence's new tokens
    if first_token >= q_len:
        return
    prefix_len = tl.load(seq_lens_ptr + seq) - q_len

    # Row r of the tile is new token first_token + r // GROUP_PAD of query head r % GROUP_PAD of the group.
    rows = tl.arange(0, BLOCK_M)
    token = first_token + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_valid = (token < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = prefix_len + token  # position in the context; the row sees keys 0..q_pos
    dims = tl.arange(0, HEAD_DIM)
    q_offsets = (q_begin + token).to(tl.int64)[:, None] * stride_q_token + head[:, None] * stride_q_head
    q = tl.load(query_ptr + q_offsets + dims[None, :], mask=row_valid[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    kv_head_offset = kv_head * stride_kv_head
    # Keys below unmasked_end are seen by every row (the first row sits at prefix_len + first_token);
    # keys from key_end on are seen by none (the last valid row sits at key_end - 1).
    unmasked_end = (prefix_len + first_token + 1) // BLOCK_N * BLOCK_N
    key_end = prefix_len + tl.minimum(first_token + BLOCK_Q, q_len)
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
        0, unmasked_end, qk_scale, stride_kv_block, stride_kv_slot,
        False, HEAD_DIM, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, KV_FP8,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, q_pos, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head_offset,
        unmasked_end, key_end, qk_scale, stride_kv_block, stride_kv_slot,
        True, HEAD_DIM, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, KV_FP8,
    )  # fmt: skip

    if KV_FP8:
        acc = acc * v_scale
    out = acc / l_i[:, None]
    out_offsets = (q_begin + token).to(tl.int64)[:, None] * stride_out_token + head[:, None] * stride_out_head
    tl.store(out_ptr + out_offsets + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of the new tokens over their whole paged context; never syncs the host.

    query: [T, Hq, D] (new tokens of all sequences, flattened); k_cache, v_cache: [num_blocks, block_size,
    Hkv, D]; block_tables: [S, max_blocks] int32; query_start_loc: [S + 1] int32 (offsets into ``query``);
    seq_lens: [S] int32 (context length including the new tokens); max_query_len: a host int at least the
    longest q_len (it sizes the grid; a smaller one leaves rows unwritten). ``out`` ([T, Hq, D]) receives
    the result if given; block_m and block_n override the tile shape (tests, tuning). The caches are of
    query's dtype, or float8_e4m3fn with the scales k_scale / v_scale (1.0 for other caches).
    Returns [T, Hq, D].
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert head_dim in TILE_CONFIGS, f"head_dim must be one of {sorted(TILE_CONFIGS)}, got {head_dim}"
    assert block_size >= 16 and block_size & (block_size - 1) == 0, (
        f"KV-cache block size must be a power of two >= 16, got {block_size}"
    )
    assert k_cache.shape == v_cache.shape and k_cache.shape[-1] == head_dim, "k/v cache shapes mismatch"
    assert num_heads % num_kv_heads == 0, f"Hq={num_heads} is not a multiple of Hkv={num_kv_heads}"
    kv_fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    assert kv_fp8 or query.dtype == k_cache.dtype, "query and KV cache must share a dtype (or be fp8)"
    assert query.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share a layout"
    for index in (block_tables, query_start_loc, seq_lens):
        assert index.dtype == torch.int32 and index.stride(-1) == 1, "index tensors: int32, unit last stride"

    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    default_m, default_n, num_warps, num_stages = (FP8_TILE_CONFIGS if kv_fp8 else TILE_CONFIGS)[head_dim]
    block_m = max(block_m or default_m, group_pad)
    block_n = block_n or default_n
    for tile in (block_m, block_n):
        assert tile >= 16 and tile & (tile - 1) == 0, f"tiles must be powers of two >= 16, got {tile}"
    block_q = block_m // group_pad
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    _paged_prefill_attention_kernel[grid](
        query, k_cache, v_cache, out,
        block_tables, query_start_loc, seq_lens,
        scale * k_scale * math.log2(math.e),
        v_scale,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        # fp32 inputs get exact fp32 products (the default would be tf32); bf16/fp16 ignore this
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        KV_FP8=kv_fp8,
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out
