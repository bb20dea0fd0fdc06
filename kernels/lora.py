"""OpenAI-Triton batched LoRA (Punica's BGMV): every token row picks its adapter's slot, so one launch serves
a step that mixes the base model and many adapters, and the launch shapes depend only on the tensors
(CUDA-graph safe: a row's slot is read from a device tensor, -1 meaning "no adapter").

    shrink:  t[i, :]        = x[i, :] @ A[slot_i]^T          A: [S, P * R, K]   (P parts of rank R)
    expand:  y[i, n]       += t[i, p(n) R : p(n) R + R] . B[slot_i, n, :]        B: [S, N, R]
             p(n) = the part output column n belongs to (q | k | v, gate | up: part_starts)

The product accumulates in fp32 and is rounded once, when added to ``y`` (the torch reference,
pagetron.kernels.lora_ref, rounds the same way). Rows without an adapter leave ``y`` untouched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slots_ptr, t_ptr, stride_x, stride_as, stride_ar, stride_t, K, RP,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if slot >= 0:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_x + ks, mask=ks < K, other=0.0).to(tl.float32)
            a_tile = a_ptr + slot * stride_as + rs[:, None] * stride_ar + ks[None, :]
            a = tl.load(a_tile, mask=(rs[:, None] < RP) & (ks[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
    tl.store(t_ptr + row * stride_t + rs, acc, mask=rs < RP)


@triton.jit
def _expand_kernel(
    t_ptr, b_ptr, slots_ptr, y_ptr, stride_t, stride_bs, stride_bn, stride_y, N, R, start1, start2,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    if slot >= 0:
        ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rs = tl.arange(0, BLOCK_R)
        part = (ns >= start1).to(tl.int32) + (ns >= start2).to(tl.int32)
        mask = (ns[:, None] < N) & (rs[None, :] < R)
        t = tl.load(t_ptr + row * stride_t + part[:, None] * R + rs[None, :], mask=mask, other=0.0)
        b_tile = b_ptr + slot * stride_bs + ns[:, None] * stride_bn + rs[None, :]
        b = tl.load(b_tile, mask=mask, other=0.0).to(tl.float32)
        delta = tl.sum(t * b, axis=1)
        y_row = y_ptr + row * stride_y + ns
        y = tl.load(y_row, mask=ns < N, other=0.0)
        tl.store(y_row, (y.to(tl.float32) + delta.to(y.dtype).to(tl.float32)).to(y.dtype), mask=ns < N)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """x [T, K] (last dim contiguous), a [S, P * R, K] contiguous, token_slots [T] int -> fp32 [T, P * R]
    (zeros on rows whose slot is -1)."""
    num_rows, k = x.shape
    rp = a.shape[1]
    out = torch.empty(num_rows, rp, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return out
    block_r = min(64, triton.next_power_of_2(rp))
    grid = (num_rows, triton.cdiv(rp, block_r))
    _shrink_kernel[grid](
        x, a, token_slots, out, x.stride(0), a.stride(0), a.stride(1), out.stride(0), k, rp,
        BLOCK_R=block_r, BLOCK_K=128,
    )  # fmt: skip
    return out


def lora_expand(
    t: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, y: torch.Tensor, part_starts: list[int]
) -> torch.Tensor:
    """y [T, N] += the expansion of t [T, P * R] (fp32) through b [S, N, R], part p reading t's p-th
    rank block for the output columns from part_starts[p] on (at most 3 parts). In place; returns y."""
    assert 1 <= len(part_starts) <= 3 and part_starts[0] == 0
    num_rows, n = y.shape
    rank = b.shape[2]
    if num_rows == 0:
        return y
    starts = [*part_starts[1:], n, n][:2]
    block_n = 64
    grid = (num_rows, triton.cdiv(n, block_n))
    _expand_kernel[grid](
        t, b, token_slots, y, t.stride(0), b.stride(0), b.stride(1), y.stride(0), n, rank,
        starts[0], starts[1], BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(rank),
    )  # fmt: skip
    return y
