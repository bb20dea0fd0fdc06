"""OpenAI-Triton rotary embedding (rotate-half layout): rotates q and k IN PLACE at each token's position.

q [T, Hq, D] and k [T, Hkv, D] are usually views into the fused qkv projection output (token stride larger
than H * D); any token and head strides work, the last dim must be contiguous. cos / sin are read from
the fp32 caches [max_position, D] at positions[t].

Numerics: each output is computed in fp32 from the fp32 cos / sin and rounded once to q's dtype, i.e.
round(x1 * cos - x2 * sin) (without FMA contraction this is the fp32 reference rounded once; a GPU build
may fuse a multiply-add, one fp32 ulp). The torch layer (apply_rotary_ref) instead rounds cos / sin to the
model dtype and rounds each product and the sum: in bf16 the two differ by those extra roundings (a few
bf16 ulps at most); the kernel is the closer one to exact rotation. In fp32 they agree to an fp32 ulp.

One program per (token, block of heads); sizes come from tensor shapes only (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(base, stride_h, head0, num_heads, cos1, sin1, cos2, sin2, HALF, offs_h, offs_d, mask_d):
    heads = head0 + offs_h
    mask = (heads < num_heads)[:, None] & mask_d[None, :]
    first = base + heads[:, None].to(tl.int64) * stride_h + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(first, (x1 * cos1 - x2 * sin1).to(dtype), mask=mask)
    tl.store(first + HALF, (x2 * cos2 + x1 * sin2).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    num_q_heads,
    num_k_heads,
    num_q_blocks,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HALF
    offs_h = tl.arange(0, BLOCK_H)
    cos_row = cos_ptr + pos * stride_cos + offs_d
    sin_row = sin_ptr + pos * stride_cos + offs_d
    cos1 = tl.load(cos_row, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_row, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_row + HALF, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_row + HALF, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if head_block < num_q_blocks:
        _rotate_heads(
            q_ptr + token * stride_qt, stride_qh, head_block * BLOCK_H, num_q_heads,
            cos1, sin1, cos2, sin2, HALF, offs_h, offs_d, mask_d,
        )  # fmt: skip
    else:
        _rotate_heads(
            k_ptr + token * stride_kt, stride_kh, (head_block - num_q_blocks) * BLOCK_H, num_k_heads,
            cos1, sin1, cos2, sin2, HALF, offs_h, offs_d, mask_d,
        )  # fmt: skip


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place (see the module docstring) and returns them."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert k.shape == (num_tokens, num_k_heads, head_dim) and k.dtype == q.dtype, "k must match q"
    assert head_dim % 2 == 0, f"head_dim must be even, got {head_dim}"
    assert q.stride(2) == 1 and k.stride(2) == 1, "q and k need a contiguous last dim"
    assert positions.shape == (num_tokens,), "one position per token"
    assert cos_cache.shape == sin_cache.shape and cos_cache.shape[-1] == head_dim, "caches [max_pos, D]"
    assert cos_cache.stride() == sin_cache.stride() and cos_cache.stride(1) == 1, (
        "caches need unit column stride"
    )
    if num_tokens == 0:
        return q, k
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_k_heads)), max(1, 512 // block_d))
    num_q_blocks = triton.cdiv(num_q_heads, block_h)
    grid = (num_tokens, num_q_blocks + triton.cdiv(num_k_heads, block_h))
    _rotary_kernel[grid](
        positions,
        q,
        k,
        cos_cache,
        sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_cache.stride(0),
        num_q_heads,
        num_k_heads,
        num_q_blocks,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return q, k
