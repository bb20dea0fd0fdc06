"""Paged decode attention in OpenAI Triton: split-KV (flash-decoding) with a reduction, GQA-aware.

Each sequence has one new query token that attends over its cached K/V, read through its block table
(layout and semantics: ``paged_decode_attention_ref`` in ``attention_ref``).

Stage 1 runs one program per (sequence, KV head, split). A split walks its share of the context in tiles
of ``BLOCK_N`` tokens; all query heads that share the KV head are scored against a tile with one
``tl.dot``, so every K/V element is read once. A split leaves an online-softmax partial per query head:
running max ``m`` (log2 domain), sum of exponentials ``l`` and the unnormalised output ``acc``.
Stage 2 merges the partials of each (sequence, query head). With one split, stage 1 writes the
normalised output itself and stage 2 is skipped.

With fp8 caches (``attention_ref``'s docstring) the e4m3 K/V tiles are converted exactly to fp16 (fp32
for an fp32 query) before the ``tl.dot``s; ``k_scale`` is folded into the softmax scale on the host and
``v_scale`` multiplies each split's accumulator once. Other caches compile without any of that.

Host-side sizes come only from tensor shapes (never from device values), so a call can be captured in a
CUDA graph.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from pagetron.kernels.attention_ref import FP8_DTYPE, check_kv_scales

_LOG2E = 1.4426950408889634
# Launch shapes of the split kernel, (BLOCK_N context tokens per K/V tile, warps, stages), by whether
# the cache is fp8. ``decode_kernel_sweep`` (benchmarks) times the candidates; on an H200 at batch 256,
# contexts 128-1300: bf16 13B MHA 811 us (4.8 TB/s of K/V), 8B GQA 188 us. fp8: the e4m3 -> bf16
# conversions make the kernel instruction-bound (ncu, 13B: DRAM 43% busy; bf16: 91%), so longer tiles
# pay: 13B 933 us (2.1 TB/s), 8B 208 us. The scoring with fp32 broadcast multiply-adds instead of a
# tl.dot padded to 16 query rows was 2x slower for MHA and 8x for GQA (not kept).
_LAUNCH = {False: (64, 4, 2), True: (128, 4, 2)}
_MIN_DOT_ROWS = 16  # tl.dot needs M >= 16: a KV head's group of query heads is padded up to this
_MIN_TOKENS_PER_SPLIT = 128  # shorter splits cost more in partials and merging than they win
_MAX_SPLITS = 64
_DEFAULT_NUM_SMS = 132  # H100 / H200; used off-GPU (the Triton interpreter)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Read when the kernels below are decorated, as triton.jit does (it decides compiled vs interpreted then).
_INTERPRETED = triton.knobs.runtime.interpret


@triton.jit
def _e4m3_to_f16(x):
    """e4m3 -> fp16 (exact), one cvt.rn.f16x2.e4m3x2 per two values. As inline asm that is not pure,
    Triton cannot sink it past the dot-operand layout change: it converts the tile as loaded and the fp16
    tile takes the bf16 path through shared memory (ldmatrix). A plain ``.to`` was sunk there, which
    read V one byte at a time and went through bf16 (SASS for sm_90: 1419 -> 674 instructions per
    thread per 128-token tile; bf16 caches: 494 per 64-token tile)."""
    return tl.inline_asm_elementwise(
        asm="{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; "
        "cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        constraints="=r,=r,r",
        args=[x],
        dtype=tl.float16,
        is_pure=False,
        pack=4,
    )


# The block-table row stride changes with the longest context of each step: specializing on it (as
# Triton does for ints divisible by 16) would compile new variants mid-serving.
@triton.jit(do_not_specialize=["stride_tb"])
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    qk_scale,  # softmax scale * k_scale * log2(e)
    v_scale,
    num_q_heads,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_tb,
    stride_tn,
    stride_ob,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two >= 16
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV-cache block
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (tf32 would cost accuracy); unused for half types
    BF16_DOT_IN_FP32: tl.constexpr,  # interpreter only: it cannot tl.dot bf16 (triton-lang/triton#11584)
    KV_FP8: tl.constexpr,  # float8e4nv caches: dequantize tiles to the query's dtype, scale the output
    ASM_CVT: tl.constexpr,  # compiled (not interpreted): convert fp8 tiles with inline asm
):
    # grid = (batch, num_kv_heads, NUM_SPLITS)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Each sequence's own tiles are shared out evenly among the splits; trailing splits may get none.
    context_len = tl.load(lens_ptr + seq)
    num_tiles = tl.cdiv(context_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g  # query heads i use KV head i // GROUP (as torch's enable_gqa)
    head_ok = g < GROUP
    # Padding rows are zeros: their scores stay finite and their results are never stored.
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=head_ok[:, None],
        other=0.0,
    )
    # fp8 caches with a half query: the dots take fp16 (e4m3 -> fp16 is one cvt per two values; -> bf16
    # goes through fp16 and costs two more). q is scaled first (qk_scale is about 0.13 for head_dim 128)
    # so that it stays far from fp16's 65504; fp16 keeps 3 more mantissa bits than bf16.
    FP16_DOT: tl.constexpr = KV_FP8 and q_ptr.dtype.element_ty != tl.float32
    DOT_TY: tl.constexpr = tl.float16 if FP16_DOT else q_ptr.dtype.element_ty
    if FP16_DOT:
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
    elif BF16_DOT_IN_FP32:  # exact: bf16 values are fp32 values; the dot already accumulates in fp32
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table_row = tables_ptr + seq * stride_tb
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_vh
    for tile in range(tile_start, tile_end):
        tokens = tile * BLOCK_N + n
        valid = tokens < context_len  # every tile in [tile_start, tile_end) has at least one valid token
        # Per-token gather, so a tile may span several cache blocks (BLOCK_SIZE < BLOCK_N) or part of one.
        # int64: block * stride can pass 2**31 elements in a large cache.
        blocks = tl.load(table_row + (tokens // BLOCK_SIZE) * stride_tn, mask=valid, other=0).to(tl.int64)
        slots = tokens % BLOCK_SIZE
        k = tl.load(
            k_head + blocks[:, None] * stride_kb + slots[:, None] * stride_kt + d[None, :] * stride_kd,
            mask=valid[:, None],
            other=0.0,
        )
        if KV_FP8:  # exact; k_scale is in qk_scale
            k = _e4m3_to_f16(k) if ASM_CVT and FP16_DOT else k.to(DOT_TY)
        if BF16_DOT_IN_FP32 and not FP16_DOT:
            k = k.to(tl.float32)
        # [GROUP_PAD, BLOCK_N] scores in the log2 domain (qk_scale folds in log2(e)), so exp2 below.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if not FP16_DOT:  # else q carries the scale
            s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # Masked V rows must be finite zeros: p is 0 there, but 0 * NaN would poison acc.
        v = tl.load(
            v_head + blocks[:, None] * stride_vb + slots[:, None] * stride_vt + d[None, :] * stride_vd,
            mask=valid[:, None],
            other=0.0,
        )
        if KV_FP8:  # exact; v_scale multiplies acc after the loop
            v = _e4m3_to_f16(v) if ASM_CVT and FP16_DOT else v.to(DOT_TY)
        p = p.to(v.dtype)  # as on the GPU: the P @ V product takes bf16/fp16 operands
        if BF16_DOT_IN_FP32 and not FP16_DOT:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    if KV_FP8:
        acc = acc * v_scale
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=head_ok[:, None],
        )
    else:
        # Partials are contiguous [batch, num_q_heads, NUM_SPLITS] (acc: [..., HEAD_DIM]). Empty splits
        # write nothing; the merge kernel recomputes which splits have work and skips the others.
        rows = (seq * num_q_heads + heads) * NUM_SPLITS + split
        heads_to_store = tl.where(tile_start < num_tiles, GROUP, 0)
        keep = g < heads_to_store
        tl.store(m_ptr + rows, m_i, mask=keep)
        tl.store(l_ptr + rows, l_i, mask=keep)
        tl.store(acc_ptr + rows[:, None] * HEAD_DIM + d[None, :], acc, mask=keep[:, None])


@triton.jit
def _merge_kernel(
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    lens_ptr,
    num_q_heads,
    stride_ob,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # NUM_SPLITS rounded up to a power of two
):
    # grid = (batch, num_q_heads)
    seq = tl.program_id(0)
    head = tl.program_id(1)

    # Same partition as _split_kernel: split s has work iff its first tile exists.
    context_len = tl.load(lens_ptr + seq)
    num_tiles = tl.cdiv(context_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    splits = tl.arange(0, SPLITS_PAD)
    has_work = (splits < NUM_SPLITS) & (splits * tiles_per_split < num_tiles)  # split 0 always has work

    d = tl.arange(0, HEAD_DIM)
    rows = (seq * num_q_heads + head) * NUM_SPLITS + splits
    m = tl.load(m_ptr + rows, mask=has_work, other=float("-inf"))
    exp_sum = tl.load(l_ptr + rows, mask=has_work, other=0.0)
    acc = tl.load(acc_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=has_work[:, None], other=0.0)

    weight = tl.exp2(m - tl.max(m, 0))  # 0 for splits without work
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(exp_sum * weight, 0)
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + d * stride_od,
        out.to(out_ptr.dtype.element_ty),
    )


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """Splits per (sequence, KV head) so that stage 1 launches about four programs per SM.

    ``max_context_len`` is a host-side bound (max_blocks * block_size), never read from the device.
    """
    programs = max(1, batch * num_kv_heads)
    wanted = triton.cdiv(4 * num_sms, programs)
    useful = triton.cdiv(max_context_len, _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, _MAX_SPLITS))


def _alloc_buffers(
    batch: int, num_q_heads: int, head_dim: int, num_splits: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Output [B, Hq, D] and, with several splits, the fp32 partials m, l [B, Hq, S] and acc [B, Hq, S, D]."""
    out = torch.empty((batch, num_q_heads, head_dim), dtype=dtype, device=device)
    if num_splits == 1:
        return out, None, None, None
    m = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=device)
    exp_sum = torch.empty_like(m)
    acc = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    return out, m, exp_sum, acc


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check_inputs(query, k_cache, v_cache, block_tables, context_lens, num_splits, k_scale, v_scale) -> None:
    if query.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(
            f"query must be [B, Hq, D] and the caches [num_blocks, block_size, Hkv, D]; got "
            f"{tuple(query.shape)} and {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    batch, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    cache_dtype_ok = k_cache.dtype == v_cache.dtype and k_cache.dtype in (query.dtype, FP8_DTYPE)
    if not cache_dtype_ok or query.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"query and caches must share one dtype of {_SUPPORTED_DTYPES} (or the caches both be "
            f"{FP8_DTYPE}); got {query.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    try:
        check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    except AssertionError as error:
        raise ValueError(str(error)) from None
    if cache_head_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {cache_head_dim}")
    if not _is_power_of_two(head_dim) or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a power of two in [16, 256] (64 and 128 tested); got {head_dim}")
    if not _is_power_of_two(block_size) or block_size < 16:
        raise ValueError(f"block_size must be a power of two >= 16; got {block_size}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError(
            f"block_tables and context_lens must be int32; got {block_tables.dtype}, {context_lens.dtype}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or tuple(context_lens.shape) != (batch,):
        raise ValueError(
            f"block_tables must be [{batch}, max_blocks] and context_lens [{batch}]; got "
            f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1; got {num_splits}")


def paged_decode_attention(
    query: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32, each in [1, max_blocks * block_size]
    scale: float,
    num_splits: int | None = None,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Decode attention over a paged KV cache; returns [B, Hq, D] in query's dtype (fp32 accumulation).

    The caches are of query's dtype, or float8_e4m3fn with the scales ``k_scale``/``v_scale`` (1.0 for
    other caches). ``num_splits`` None picks :func:`default_num_splits` from B, Hkv and
    max_blocks * block_size.
    """
    _check_inputs(query, k_cache, v_cache, block_tables, context_lens, num_splits, k_scale, v_scale)
    batch, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_splits is None:
        max_context_len = block_tables.shape[1] * block_size
        num_splits = default_num_splits(batch, num_kv_heads, max_context_len, _num_sms(query.device))
    out, m, exp_sum, acc = _alloc_buffers(batch, num_q_heads, head_dim, num_splits, query.dtype, query.device)
    if batch == 0:
        return out
    context_lens = context_lens.contiguous()  # the kernels index it as a flat array
    group = num_q_heads // num_kv_heads
    kv_fp8 = k_cache.dtype == FP8_DTYPE
    block_n, num_warps, num_stages = _LAUNCH[kv_fp8]  # the merge kernel must see the same tiles

    _split_kernel[(batch, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        m,
        exp_sum,
        acc,
        scale * k_scale * _LOG2E,
        v_scale,
        num_q_heads,
        *query.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *block_tables.stride(),
        *out.stride(),
        GROUP=group,
        GROUP_PAD=max(_MIN_DOT_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        BF16_DOT_IN_FP32=_INTERPRETED and query.dtype == torch.bfloat16,
        KV_FP8=kv_fp8,
        ASM_CVT=not _INTERPRETED,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_kernel[(batch, num_q_heads)](
            out,
            m,
            exp_sum,
            acc,
            context_lens,
            num_q_heads,
            *out.stride(),
            HEAD_DIM=head_dim,
            BLOCK_N=block_n,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out
