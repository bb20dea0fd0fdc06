"""OpenAI-Triton batched LoRA over a step's token rows grouped by adapter slot (Punica's SGMV, as vLLM's
kernels do it): each program takes up to BLOCK_M rows of one slot, so an adapter's A and B tiles are read
once per block of its rows and multiplied on the tensor cores, whatever the mix of adapters in the step.
Launch shapes depend only on the number of rows and slots (CUDA-graph safe: which rows belong to which
slot is read from device tensors that ``group_rows`` computes once per step; -1 means "no adapter").

    shrink:  t[i, :]        = x[i, :] @ A[slot_i]^T          A: [S, P * R, K]   (P parts of rank R)
    expand:  y[i, n]       += t[i, p(n) R : p(n) R + R] . B[slot_i, n, :]        B: [S, N, R]
             p(n) = the part output column n belongs to (q | k | v, gate | up: part_starts)

    rows grouped:  token_slots [ -1  0  2  0 -1  1  2  2 ]
                   order       [  0  4 | 1  3 | 5 | 2  6  7 ]   rows sorted by slot (stable)
                   blocks      (slot 0, order[2:4]) (slot 1, order[4:5]) (slot 2, order[5:8])  <- programs
                               (up to BLOCK_M rows of one slot each; LARGE_BLOCK_M in long steps)
                   block_rows  [[1 3 -1 ..] [5 -1 ..] [2 6 7 -1 ..] [-1 ..]]   what each program reads

``lora_expand_silu_and_mul`` is a gate|up expand fused into the SiLU-and-mul after it (its programs take
blocks of every row, grouped by slot + 1 so that the rows without an adapter have blocks too).

The shrink accumulates in fp32, split over K (partial sums added atomically, so the last bits may vary
between runs); the expand multiplies t rounded to B's dtype (as PEFT rounds the
intermediate) and adds to ``y`` rounding once. Rows without an adapter leave ``y`` untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # rows of one slot per program (tl.dot's smallest M) ...
# ... and in steps of more rows than this (prefill chunks), 64: the expand of such a step is bound by
# reading and writing its output, which 16-row tiles (hundreds of thousands of programs for a gate_up
# projection of 8,192 rows) move at a fraction of the bandwidth. Decode steps (CUDA graphs) stay at 16
# rows, where each slot has a few rows.
LARGE_STEP_ROWS = 1024
LARGE_BLOCK_M = 64
# NOTE: launch shapes from lora_kernel_sweep.py in CUDA graphs on an H100 (8B shape, rank 16; raw JSON
# 2026-12-07-h100-lora-kernel-sweep-3ecf5c1.json). Expand tiles of 128 columns beat 64 at 128 decode rows
# over 32 slots (gate_up 15.8 -> 13.3 us, qkv 5.1 -> 4.2, o and down 3.8 -> 3.3) and tie elsewhere; a
# shrink program walking at most 4 K tiles instead of 8 is as fast or faster in every case (1 row: 5.3 ->
# 4.5 us for qkv).
EXPAND_BLOCK_N = 128
EXPAND_B_TILE_BYTES = 64 << 10  # B [rank, BLOCK_N] a program holds: fewer columns at high ranks (fp32)


@dataclass
class LoRARows:
    """A step's token rows grouped by slot, on the device (``group_rows``)."""

    block_slot: torch.Tensor  # [B] int32 slot of each program's block of rows, -1: no block
    block_rows: torch.Tensor  # [B, block_m] int32 each block's row indices, -1 past its last row
    block_m: int = BLOCK_M  # rows a block holds at most


def group_rows(token_slots: torch.Tensor, num_slots: int, block_m: int | None = None) -> LoRARows:
    """Groups rows by slot with device ops only (no host sync: capturable in a CUDA graph), in blocks of
    ``block_m`` rows (default: by the number of rows, above). A step of T rows over k distinct slots has
    at most ceil(T / block_m) + k blocks, and k <= min(S, T)."""
    device, num_rows = token_slots.device, token_slots.shape[0]
    if block_m is None:
        block_m = BLOCK_M if num_rows <= LARGE_STEP_ROWS else LARGE_BLOCK_M
    slots = token_slots.to(torch.int64)
    sorted_slots, order = torch.sort(slots, stable=True)
    bounds = torch.searchsorted(sorted_slots, torch.arange(num_slots + 1, device=device))
    counts = bounds[1:] - bounds[:-1]
    blocks = (counts + block_m - 1) // block_m
    ends = torch.cumsum(blocks, 0)
    num_blocks = triton.cdiv(num_rows, block_m) + min(num_slots, num_rows)
    program = torch.arange(num_blocks, device=device)
    slot = torch.searchsorted(ends, program, right=True)
    valid = slot < num_slots
    slot = slot.clamp(max=num_slots - 1)
    start = bounds[slot] + (program - (ends[slot] - blocks[slot])) * block_m
    # NOTE: each block's rows are spelled out here, once a step, so that a kernel's program finds its rows
    # with one load instead of three dependent ones (its start, its slot's end, then the order): every LoRA
    # kernel of a decode step is a few microseconds of such latency
    pos = start[:, None] + torch.arange(block_m, device=device)[None, :]
    real = valid[:, None] & (pos < bounds[1:][slot][:, None])
    block_rows = torch.where(real, order[pos.clamp(max=max(num_rows - 1, 0))], -1)
    return LoRARows(
        block_slot=torch.where(valid, slot, -1).to(torch.int32),
        block_rows=block_rows.to(torch.int32),
        block_m=block_m,
    )


@triton.jit
def _block_rows(block_slot_ptr, block_rows_ptr, BLOCK_M: tl.constexpr):
    """This program's slot (-1: none) and its rows (row indices, and which of the BLOCK_M are real)."""
    block = tl.program_id(0)
    slot = tl.load(block_slot_ptr + block)
    rows = tl.load(block_rows_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    real = rows >= 0
    return slot.to(tl.int64), tl.maximum(rows, 0).to(tl.int64), real


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, t_ptr, block_slot_ptr, block_rows_ptr,
    stride_x, stride_as, stride_ar, stride_t, K, RP, K_PER_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    slot, rows, real = _block_rows(block_slot_ptr, block_rows_ptr, BLOCK_M)
    if slot >= 0:
        rs = tl.arange(0, BLOCK_R)
        k_begin = tl.program_id(1) * K_PER_SPLIT
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_begin, tl.minimum(k_begin + K_PER_SPLIT, K), BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x_mask = real[:, None] & (ks[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=x_mask, other=0.0)
            a_tile = a_ptr + slot * stride_as + rs[None, :] * stride_ar + ks[:, None]  # [BLOCK_K, BLOCK_R]
            a = tl.load(a_tile, mask=(ks[:, None] < K) & (rs[None, :] < RP), other=0.0)
            if IEEE:
                acc += tl.dot(x, a, input_precision="ieee")
            else:
                acc += tl.dot(x, a)
        out = t_ptr + rows[:, None] * stride_t + rs[None, :]
        mask = real[:, None] & (rs[None, :] < RP)
        if SPLIT_K == 1:
            tl.store(out, acc, mask=mask)
        else:
            tl.atomic_add(out, acc, mask=mask)


@triton.jit
def _expand_kernel(
    t_ptr, b_ptr, y_ptr, block_slot_ptr, block_rows_ptr,
    stride_t, stride_bs, stride_bn, stride_y, N, R, start1, start2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PARTS: tl.constexpr,
    IEEE: tl.constexpr, ACCUMULATE: tl.constexpr,
):  # fmt: skip
    slot, rows, real = _block_rows(block_slot_ptr, block_rows_ptr, BLOCK_M)
    if slot >= 0:
        n0 = tl.program_id(1) * BLOCK_N
        ns = n0 + tl.arange(0, BLOCK_N)
        rs = tl.arange(0, BLOCK_R)
        part_of_n = (ns >= start1).to(tl.int32) + (ns >= start2).to(tl.int32)
        b_tile = b_ptr + slot * stride_bs + ns[None, :] * stride_bn + rs[:, None]  # [BLOCK_R, BLOCK_N]
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p in tl.static_range(PARTS):
            if p == 0:
                part_begin, part_end = 0, start1
            elif p == 1:
                part_begin, part_end = start1, start2
            else:
                part_begin, part_end = start2, N
            if (n0 < part_end) & (n0 + BLOCK_N > part_begin):  # the tile holds columns of part p
                t_rows = t_ptr + rows[:, None] * stride_t + p * R + rs[None, :]
                t = tl.load(t_rows, mask=real[:, None] & (rs[None, :] < R), other=0.0)
                b_mask = (rs[:, None] < R) & (ns[None, :] < N) & (part_of_n[None, :] == p)
                b = tl.load(b_tile, mask=b_mask, other=0.0)
                if IEEE:
                    delta += tl.dot(t.to(b.dtype), b, input_precision="ieee")
                else:
                    delta += tl.dot(t.to(b.dtype), b)
        y_rows = y_ptr + rows[:, None] * stride_y + ns[None, :]
        mask = real[:, None] & (ns[None, :] < N)
        if ACCUMULATE:
            y = tl.load(y_rows, mask=mask, other=0.0)
            tl.store(y_rows, (y.to(tl.float32) + delta.to(y.dtype).to(tl.float32)).to(y.dtype), mask=mask)
        else:
            tl.store(y_rows, delta.to(y_ptr.dtype.element_ty), mask=mask)


def _block_r(width: int) -> int:
    return max(16, triton.next_power_of_2(width))  # tl.dot's smallest N and K


SHRINK_STAGE_BYTES = 64 << 10  # shared memory for one pipeline stage's x and A tiles (3 stages < 227 KB)


def _shrink_block_k(block_m: int, block_r: int, itemsize: int) -> int:
    """64, or less where a stage's x [block_m, K] and A [K, block_r] tiles would not fit (high ranks of a
    fused projection with 64-row blocks, or fp32): at least 16, tl.dot's smallest K."""
    block_k = 64
    while block_k > 16 and block_k * (block_m + block_r) * itemsize > SHRINK_STAGE_BYTES:
        block_k //= 2
    return block_k


def _expand_block_n(block_r: int, itemsize: int) -> int:
    """EXPAND_BLOCK_N, or less where a program's B tile [block_r, N] would pass EXPAND_B_TILE_BYTES (high
    ranks in fp32): at least 16, tl.dot's smallest N."""
    block_n = EXPAND_BLOCK_N
    while block_n > 16 and block_r * block_n * itemsize > EXPAND_B_TILE_BYTES:
        block_n //= 2
    return block_n


SHRINK_TILES = 4  # K tiles a shrink program walks at most (below)


def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    rows: LoRARows,
    out: torch.Tensor | None = None,
    block_k: int | None = None,
    tiles: int = SHRINK_TILES,
    num_warps: int = 4,
) -> torch.Tensor:
    """x [T, K] (last dim contiguous), a [S, P * R, K] contiguous -> fp32 [T, P * R] (zeros on rows
    without an adapter), written into ``out`` where given: fp32 [T, P * R], zeroed, last dim contiguous
    (a layer's columns of a workspace that the step zeroed once for all its layers). ``block_k``,
    ``tiles`` and ``num_warps`` are launch choices (lora_kernel_sweep.py times them)."""
    num_rows, k = x.shape
    rp = a.shape[1]
    if out is None:
        out = torch.zeros(num_rows, rp, dtype=torch.float32, device=x.device)
    assert out.shape == (num_rows, rp) and out.dtype == torch.float32 and out.stride(1) == 1
    if num_rows == 0:
        return out
    block_r = _block_r(rp)
    block_k = block_k or _shrink_block_k(rows.block_m, block_r, x.element_size())
    # NOTE: the product is memory- and latency-bound, and a program walks its K range serially: split K so
    # that each program loads at most about ``tiles`` tiles (partial sums added atomically), however many
    # rows. Unsplit, a decode step's down projection (K = 14,336) was 224 dependent loads per program.
    split_k = max(1, min(64, triton.cdiv(k, tiles * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    grid = (rows.block_slot.shape[0], triton.cdiv(k, k_per_split))
    _shrink_kernel[grid](
        x, a, out, rows.block_slot, rows.block_rows,
        x.stride(0), a.stride(0), a.stride(1), out.stride(0), k, rp, k_per_split,
        BLOCK_M=rows.block_m, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=grid[1],
        IEEE=x.dtype == torch.float32, num_warps=num_warps,
    )  # fmt: skip
    return out


def lora_expand(
    t: torch.Tensor,
    b: torch.Tensor,
    rows: LoRARows,
    y: torch.Tensor,
    part_starts: list[int],
    block_n: int | None = None,
    num_warps: int = 4,
    accumulate: bool = True,
) -> torch.Tensor:
    """y [T, N] += the expansion of t [T, P * R] (fp32) through b [S, N, R], part p reading t's p-th
    rank block for the output columns from part_starts[p] on (at most 3 parts). In place; returns y.
    With ``accumulate`` False the expansion, rounded to y's dtype, is written over y's rows that have an
    adapter instead (a delta for the next kernel to add; the other rows are left as they are).
    ``block_n`` and ``num_warps`` are launch choices (lora_kernel_sweep.py times them)."""
    assert 1 <= len(part_starts) <= 3 and part_starts[0] == 0
    num_rows, n = y.shape
    rank = b.shape[2]
    if num_rows == 0:
        return y
    starts = [*part_starts[1:], n, n][:2]
    block_r = _block_r(rank)
    block_n = block_n or _expand_block_n(block_r, b.element_size())
    grid = (rows.block_slot.shape[0], triton.cdiv(n, block_n))
    _expand_kernel[grid](
        t, b, y, rows.block_slot, rows.block_rows,
        t.stride(0), b.stride(0), b.stride(1), y.stride(0), n, rank, starts[0], starts[1],
        BLOCK_M=rows.block_m, BLOCK_N=block_n, BLOCK_R=block_r, PARTS=len(part_starts),
        IEEE=b.dtype == torch.float32, ACCUMULATE=accumulate, num_warps=num_warps,
    )  # fmt: skip
    return y


@triton.jit
def _expand_silu_and_mul_kernel(
    x_ptr, t_ptr, b_ptr, out_ptr, block_slot_ptr, block_rows_ptr,
    stride_x, stride_t, stride_bs, stride_bn, stride_o, SIZE, R,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_CHUNK: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    group, rows, real = _block_rows(block_slot_ptr, block_rows_ptr, BLOCK_M)
    if group >= 0:  # groups are slots + 1: group 0 holds the rows without an adapter
        ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = real[:, None] & (ns[None, :] < SIZE)
        x_rows = x_ptr + rows[:, None] * stride_x + ns[None, :]
        gate = tl.load(x_rows, mask=mask, other=0.0)
        up = tl.load(x_rows + SIZE, mask=mask, other=0.0)
        dtype = gate.dtype
        gate, up = gate.to(tl.float32), up.to(tl.float32)
        if group > 0:
            d_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            d_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            b_slot = b_ptr + (group - 1) * stride_bs
            for r0 in tl.static_range(0, BLOCK_R, R_CHUNK):  # high ranks in chunks: bounded tiles
                rs = r0 + tl.arange(0, R_CHUNK)
                t_mask = real[:, None] & (rs[None, :] < R)
                t_rows = t_ptr + rows[:, None] * stride_t + rs[None, :]
                b_tile = b_slot + ns[None, :] * stride_bn + rs[:, None]  # [R_CHUNK, BLOCK_N]
                b_mask = (rs[:, None] < R) & (ns[None, :] < SIZE)
                b_gate = tl.load(b_tile, mask=b_mask, other=0.0)
                b_up = tl.load(b_tile + SIZE * stride_bn, mask=b_mask, other=0.0)
                t_gate = tl.load(t_rows, mask=t_mask, other=0.0).to(b_gate.dtype)
                t_up = tl.load(t_rows + R, mask=t_mask, other=0.0).to(b_gate.dtype)
                if IEEE:
                    d_gate += tl.dot(t_gate, b_gate, input_precision="ieee")
                    d_up += tl.dot(t_up, b_up, input_precision="ieee")
                else:
                    d_gate += tl.dot(t_gate, b_gate)
                    d_up += tl.dot(t_up, b_up)
            # the bits of the expand's add in place: the delta rounded, then the sum rounded
            gate = (gate + d_gate.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            up = (up + d_up.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_o + ns[None, :], (silu * up).to(dtype), mask=mask)


EXPAND_SILU_BLOCK_N = 64


def lora_expand_silu_and_mul(
    gate_up: torch.Tensor,
    t: torch.Tensor,
    b: torch.Tensor,
    all_rows: LoRARows,
    out: torch.Tensor | None = None,
    block_n: int = EXPAND_SILU_BLOCK_N,
    num_warps: int = 4,
) -> torch.Tensor:
    """silu(gate + dg) * (up + du), [T, I], where gate_up [T, 2 I] is a gate|up projection's base output
    and (dg | du) its LoRA expansion of t [T, 2 R] (fp32) through b [S, 2 I, R]: the expand fused into the
    SiLU-and-mul that reads gate_up anyway, so the expansion is never written out (in a long step, most of
    the bytes a LoRA layer adds). ``all_rows`` groups every row, by slot + 1 (``group_rows(token_slots +
    1, S + 1)``: group 0 holds the rows without an adapter, which take silu(gate) * up alone). The same
    roundings as lora_expand in place, then silu_and_mul (ranks above 64 sum their products in chunks of
    64, so the fp32 sums may differ from lora_expand's in their last bits). ``block_n`` and ``num_warps``
    are launch choices (lora_kernel_sweep.py times them)."""
    num_rows, size = gate_up.shape[0], gate_up.shape[1] // 2
    assert gate_up.dim() == 2 and gate_up.shape[1] == 2 * size and gate_up.stride(1) == 1
    assert b.shape[1] == 2 * size and t.shape == (num_rows, 2 * b.shape[2]) and t.stride(1) == 1
    if out is None:
        out = torch.empty(num_rows, size, dtype=gate_up.dtype, device=gate_up.device)
    assert out.shape == (num_rows, size) and out.dtype == gate_up.dtype and out.stride(1) == 1
    if num_rows == 0:
        return out
    rank = b.shape[2]
    grid = (all_rows.block_slot.shape[0], triton.cdiv(size, block_n))
    _expand_silu_and_mul_kernel[grid](
        gate_up, t, b, out, all_rows.block_slot, all_rows.block_rows,
        gate_up.stride(0), t.stride(0), b.stride(0), b.stride(1), out.stride(0), size, rank,
        BLOCK_M=all_rows.block_m, BLOCK_N=block_n, BLOCK_R=_block_r(rank), R_CHUNK=min(64, _block_r(rank)),
        IEEE=b.dtype == torch.float32, num_warps=num_warps,
    )  # fmt: skip
    return out
