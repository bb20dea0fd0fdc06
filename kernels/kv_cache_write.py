"""OpenAI-Triton KV-cache write: new K/V rows go to their slots; a negative slot (padding) is skipped.

Unlike the torch reference it never looks at the slots on the host, so it can run inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,  # token strides of key / value (rows of num_kv_heads * head_dim)
    row_size: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < row_size
        k = tl.load(key_ptr + token * stride_kt + offs, mask=mask)
        v = tl.load(value_ptr + token * stride_vt + offs, mask=mask)
        tl.store(k_cache_ptr + slot * row_size + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * row_size + offs, v, mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key, value [T, Hkv, D] with contiguous rows; caches [num_blocks, block_size, Hkv, D]; slots [T]."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    row_size = key.shape[1] * key.shape[2]
    assert key.stride(2) == 1 and key.stride(1) == key.shape[2], "key rows must be contiguous"
    assert value.stride(2) == 1 and value.stride(1) == value.shape[2], "value rows must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        row_size=row_size,
        BLOCK=triton.next_power_of_2(row_size),
    )
