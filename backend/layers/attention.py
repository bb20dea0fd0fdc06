"""Paged attention layer: writes the new K/V into the cache, then attends over the cached context."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagetron.kernels.attention_ref import (
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    write_kv_cache_ref,
)


@dataclass
class AttentionMetadata:
    """Where the flattened tokens of one step go. Decode tokens (one per sequence) come first."""

    slot_mapping: torch.Tensor  # [T] int64
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decode, max_blocks] int32
    decode_context_lens: torch.Tensor  # [num_decode] int32
    prefill_block_tables: torch.Tensor  # [num_prefill_seqs, max_blocks] int32
    prefill_query_start_loc: list[int]  # offsets into the prefill part of the tokens
    prefill_seq_lens: list[int]


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D], k and v: [T, Hkv, D] -> [T, Hq, D]."""
        write_kv_cache_ref(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        num_decode = meta.num_decode_tokens
        if num_decode == q.shape[0]:
            return self._decode(q, meta)
        if num_decode == 0:
            return self._prefill(q, meta)
        return torch.cat((self._decode(q[:num_decode], meta), self._prefill(q[num_decode:], meta)))

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return paged_decode_attention_ref(
            q, self.k_cache, self.v_cache, meta.decode_block_tables, meta.decode_context_lens, self.scale
        )

    def _prefill(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return paged_prefill_attention_ref(
            q,
            self.k_cache,
            self.v_cache,
            meta.prefill_block_tables,
            meta.prefill_query_start_loc,
            meta.prefill_seq_lens,
            self.scale,
        )
