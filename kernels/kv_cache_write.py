"""OpenAI-Triton KV-cache write: new K/V rows go to their slots; a negative slot (padding) is skipped.

Unlike the torch reference it never looks at the slots on the host, so it can run inside a CUDA graph.
With fp8 caches it quantizes as ``write_kv_cache_ref`` does (``attention_ref``'s docstring): times the
fp32 reciprocal of the scale, clamped to +-448, rounded to nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagetron.kernels.attention_ref import FP8_MAX, check_kv_scales


@triton.jit
def _to_fp8(x, inv_scale, LIMIT: tl.constexpr):
    x = tl.clamp(x.to(tl.float32) * inv_scale, -LIMIT, LIMIT, propagate_nan=tl.PropagateNan.ALL)
    return x.to(tl.float8e4nv, fp_downcast_rounding="rtne")


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_vt,  # token strides of key / value (rows of num_kv_heads * head_dim)
    k_inv_scale,
    v_inv_scale,  # fp8 only: 1 / k_scale, 1 / v_scale
    row_size: tl.constexpr,
    BLOCK: tl.constexpr,
    KV_FP8: tl.constexpr,
    FP8_LIMIT: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < row_size
        k = tl.load(key_ptr + token * stride_kt + offs, mask=mask)
        v = tl.load(value_ptr + token * stride_vt + offs, mask=mask)
        if KV_FP8:
            k = _to_fp8(k, k_inv_scale, FP8_LIMIT)
            v = _to_fp8(v, v_inv_scale, FP8_LIMIT)
        tl.store(k_cache_ptr + slot * row_size + offs, k, mask=mask)
        tl.store(v_cache_ptr + slot * row_size + offs, v, mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """key, value [T, Hkv, D] with contiguous rows; caches [num_blocks, block_size, Hkv, D]; slots [T].

    The caches are of key's dtype, or float8_e4m3fn with positive scales (other caches: scales 1.0).
    """
    fp8 = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
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
        1.0 / k_scale,
        1.0 / v_scale,
        row_size=row_size,
        BLOCK=triton.next_power_of_2(row_size),
        KV_FP8=fp8,
        FP8_LIMIT=FP8_MAX,
    )
