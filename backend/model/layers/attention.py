"""Paged attention layer: writes the new K/V into the cache, then attends over the cached context.

The kernels come from the KernelOps the layer is built with (pagetron.backend.model.kernel_ops).
The caches are of the activations' dtype, or float8_e4m3fn with the per-layer scales ``k_scale`` and
``v_scale`` (Python floats, 1.0 as in vLLM without calibration; 1.0 is the only value other caches take).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagetron.backend.model.kernel_ops import TORCH_OPS, KernelOps


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
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, ops: KernelOps = TORCH_OPS):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.ops = ops

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D], k and v: [T, Hkv, D] -> [T, Hq, D]."""
        if meta.skip_attention:
            return q
        self.ops.write_kv_cache(
            k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale
        )
        num_decode = meta.num_decode_tokens
        if num_decode == q.shape[0]:
            return self._run(self.ops.decode_attention, q, meta)
        if num_decode == 0:
            return self._run(self.ops.prefill_attention, q, meta)
        decoded = self._run(self.ops.decode_attention, q[:num_decode], meta)
        return torch.cat((decoded, self._run(self.ops.prefill_attention, q[num_decode:], meta)))

    def _run(self, attention, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return attention(q, self.k_cache, self.v_cache, meta, self.scale, self.k_scale, self.v_scale)
