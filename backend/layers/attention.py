"""Paged attention layer: writes the new K/V into the cache, then attends over the cached context.

Two backends with one meaning: "torch" (the references in pagetron.kernels.attention_ref, the CPU path)
and "triton" (OpenAI-Triton kernels, CUDA only, imported lazily so CPU runs never compile them).
The caches are of the activations' dtype, or float8_e4m3fn with the per-layer scales ``k_scale`` and
``v_scale`` (Python floats, 1.0 as in vLLM without calibration; 1.0 is the only value other caches take).
"""

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
    # the same on the device, for kernels that must not sync the host
    prefill_query_start_loc_t: torch.Tensor | None = None  # [num_prefill_seqs + 1] int32
    prefill_seq_lens_t: torch.Tensor | None = None  # [num_prefill_seqs] int32
    max_prefill_query_len: int = 0
    skip_attention: bool = False  # profiling run: no cache, attention returns its query


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: str = "torch"):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.backend = backend

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D], k and v: [T, Hkv, D] -> [T, Hq, D]."""
        if meta.skip_attention:
            return q
        write = write_kv_cache_ref
        if self.backend == "triton":
            from pagetron.kernels.kv_cache_write import write_kv_cache as write
        write(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        num_decode = meta.num_decode_tokens
        if num_decode == q.shape[0]:
            return self._decode(q, meta)
        if num_decode == 0:
            return self._prefill(q, meta)
        return torch.cat((self._decode(q[:num_decode], meta), self._prefill(q[num_decode:], meta)))

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        decode = paged_decode_attention_ref
        if self.backend == "triton":
            from pagetron.kernels.paged_decode_attention import paged_decode_attention as decode
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale}
        return decode(q, self.k_cache, self.v_cache, tables, lens, self.scale, **scales)

    def _prefill(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale}
        if self.backend == "triton":
            from pagetron.kernels.paged_prefill_attention import paged_prefill_attention

            starts, lens = meta.prefill_query_start_loc_t, meta.prefill_seq_lens_t
            tables, longest = meta.prefill_block_tables, meta.max_prefill_query_len
            return paged_prefill_attention(
                q, self.k_cache, self.v_cache, tables, starts, lens, self.scale, longest, **scales
            )
        starts, lens = meta.prefill_query_start_loc, meta.prefill_seq_lens
        return paged_prefill_attention_ref(
            q, self.k_cache, self.v_cache, meta.prefill_block_tables, starts, lens, self.scale, **scales
        )
