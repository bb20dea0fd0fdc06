"""Torch reference implementations of the paged-attention operations.

They define the semantics the GPU kernels must match, and they are the CPU path of the engine.
KV cache layout (one layer): ``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t`` of a
sequence lives in block ``block_table[t // block_size]`` at offset ``t % block_size``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache_ref(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64, slot = block * block_size + offset; -1 = skip (padding)
) -> None:
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
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
) -> torch.Tensor:
    batch, num_heads, head_dim = query.shape
    block_size = k_cache.shape[1]
    max_blocks = block_tables.shape[1]
    tables = block_tables.long()
    keys = k_cache[tables].flatten(1, 2)  # [B, max_blocks * block_size, Hkv, D]
    values = v_cache[tables].flatten(1, 2)
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
) -> torch.Tensor:
    """Causal attention of new tokens over their whole context (cached prefix + themselves)."""
    out = torch.empty_like(query)
    num_heads = query.shape[1]
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        keys = gather_kv_ref(k_cache, block_tables[i], seq_len)
        values = gather_kv_ref(v_cache, block_tables[i], seq_len)
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
