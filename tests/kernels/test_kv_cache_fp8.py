"""fp8 (float8_e4m3fn) KV cache: the reference semantics, and how close fp8 attention stays to attention
over the unquantized K/V.

The semantics live in ``attention_ref``'s docstring; the kernel tests (test_kernel_*.py) compare the Triton
kernels with these references on fp8 caches. Here: e4m3 rounding and clamping as documented, the error
that fp8 storage adds (run with ``-s`` to see the figures), and the Attention layer passing its scales on
(torch ops on CPU; on CUDA also the Triton ops against them).
"""

from __future__ import annotations

import pytest
import torch

from kernel_testing import needs_cuda, relative_error, triton_ops_for_device
from pagetron.backend.model.kernel_ops import TORCH_OPS
from pagetron.backend.model.layers.attention import Attention, AttentionMetadata
from pagetron.kernels.attention_ref import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_kv,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
    quantize_fp8,
    write_kv_cache_ref,
)


def fp8_from_bits(bits) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE)


def bits(x: torch.Tensor) -> list[int]:
    return x.view(torch.uint8).tolist()


POSITIVE_FINITE = list(range(0x7F))  # 0x00 (zero) .. 0x7e (448); 0x7f is NaN


def test_every_e4m3_value_round_trips():
    for sign in (0, 0x80):
        codes = [sign | b for b in POSITIVE_FINITE]
        values = fp8_from_bits(codes).float()
        assert bits(quantize_fp8(values, 1.0)) == codes
        assert bits(quantize_fp8(values.bfloat16(), 1.0)) == codes  # every e4m3 value is a bf16 value
        assert bits(quantize_fp8(values * 0.25, 0.25)) == codes  # a power-of-two scale is exact


def test_rounding_is_to_nearest_ties_to_even_including_subnormals_and_exponent_carries():
    values = fp8_from_bits(POSITIVE_FINITE).float()
    low, high = values[:-1], values[1:]
    mid = (low + high) / 2  # exact in fp32
    even = [b if b % 2 == 0 else b + 1 for b in POSITIVE_FINITE[:-1]]
    assert bits(quantize_fp8(mid, 1.0)) == even
    assert bits(quantize_fp8(-mid, 1.0)) == [0x80 | b for b in even]
    above = torch.nextafter(mid, torch.full_like(mid, 1e9))
    below = torch.nextafter(mid, torch.zeros_like(mid))
    assert bits(quantize_fp8(above, 1.0)) == POSITIVE_FINITE[1:]
    assert bits(quantize_fp8(below, 1.0)) == POSITIVE_FINITE[:-1]
    # spot checks: the smallest subnormal is 2**-9; a carry from mantissa 7 into the next binade
    assert quantize_fp8(
        torch.tensor([2.0**-10, 3 * 2.0**-10, 0.0302734375, 1.9375]), 1.0
    ).float().tolist() == [
        0.0,
        2.0**-8,
        0.03125,
        2.0,
    ]


def test_values_past_448_clamp_and_nan_stays_nan():
    x = torch.tensor([448.0, 449.0, 464.0, 480.0, 1e30, float("inf"), -500.0, float("-inf"), float("nan")])
    q = quantize_fp8(x, 1.0).float()
    assert q[:-1].tolist() == [FP8_MAX] * 6 + [-FP8_MAX] * 2
    assert q[-1].isnan()
    # the scale divides before the clamp: 10 / 0.01 = 1000 clamps, 3.2 / 0.01 = 320 does not
    assert quantize_fp8(torch.tensor([10.0, 3.2]), 0.01).float().tolist() == [FP8_MAX, 320.0]


def test_scale_is_the_fp32_reciprocal_times_x():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * 3
    for scale in (0.037, 0.3, 1.7):
        inverse = torch.tensor(1.0 / scale, dtype=torch.float32)
        expected = (x * inverse).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        assert bits(quantize_fp8(x, scale)) == bits(expected)
        assert bits(quantize_fp8(x.half(), scale)) == bits((x.half().float() * inverse).to(FP8_DTYPE))


def test_dequantize():
    cache = fp8_from_bits([0x38, 0x40, 0xB8, 0x01])  # 1, 2, -1, 2**-9
    assert dequantize_kv(cache, 0.5, torch.float32).tolist() == [0.5, 1.0, -0.5, 2.0**-10]
    assert dequantize_kv(cache, 3.0, torch.bfloat16).dtype == torch.bfloat16
    plain = torch.randn(3)
    assert dequantize_kv(plain, 1.0, torch.float32) is plain


def test_reference_write_stores_quantized_rows_and_skips_padding():
    gen = torch.Generator().manual_seed(1)
    key, value = torch.randn(2, 5, 2, 16, generator=gen) * 30
    k_cache = torch.zeros(3, 16, 2, 16, dtype=FP8_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, -1, 47, 20, -1])
    write_kv_cache_ref(key, value, k_cache, v_cache, slots, k_scale=0.1, v_scale=0.2)
    rows_k, rows_v = k_cache.view(48, 2, 16), v_cache.view(48, 2, 16)
    for token, slot in ((0, 0), (2, 47), (3, 20)):
        assert bits(rows_k[slot]) == bits(quantize_fp8(key[token], 0.1))
        assert bits(rows_v[slot]) == bits(quantize_fp8(value[token], 0.2))
    written = rows_k.view(torch.uint8).flatten(1).any(1).nonzero().flatten().tolist()
    assert set(written) <= {0, 47, 20}
    with pytest.raises(AssertionError, match="fp8 caches only"):
        write_kv_cache_ref(key, value, k_cache.float(), v_cache.float(), slots, k_scale=0.1)


# ---- how far fp8 storage moves attention ----


def paged_case(context_lens, num_kv_heads, head_dim, block_size, magnitude, seed):
    """fp32 K/V ~ magnitude * N(0, 1) in scattered blocks; block tables for the given context lengths."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen) * magnitude
    v_cache = torch.randn(shape, generator=gen) * magnitude
    tables = torch.zeros(len(context_lens), max(blocks), dtype=torch.int32)
    owned = torch.randperm(num_blocks, generator=gen)[: sum(blocks)].int().split(blocks)
    for row, ids in zip(tables, owned):
        row[: len(ids)] = ids
    return k_cache, v_cache, tables, gen


def calibrated(cache):
    """A per-tensor scale that maps the largest |value| to 448."""
    return cache.abs().max().item() / FP8_MAX


# K/V relative rounding error of e4m3 (3 mantissa bits): about 2.6e-2 (RMS) on N(0, 1) data. Attention
# output over random data inherits it: seen 2.7e-2 in decode and 3.6e-2 in prefill (fp32 or bf16 query,
# unit or calibrated scales alike), against 1.8e-3 for bf16 caches with a bf16 query.
FP8_MAX_REL_ERROR = 5e-2
FP8_MIN_REL_ERROR = 1e-2  # less would mean the fp8 path did not quantize at all


@pytest.mark.parametrize("scales", ["unit", "calibrated"])
@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_fp8_decode_stays_close_to_unquantized_attention(query_dtype, scales):
    lens = [700, 1, 333, 1000, 64, 517]
    k_cache, v_cache, tables, gen = paged_case(lens, 2, 128, 16, 1.0, seed=2)
    query = torch.randn(len(lens), 8, 128, generator=gen)  # GQA: 4 query heads per KV head
    context_lens = torch.tensor(lens, dtype=torch.int32)
    k_scale, v_scale = (1.0, 1.0) if scales == "unit" else (calibrated(k_cache), calibrated(v_cache))
    k8, v8 = quantize_fp8(k_cache, k_scale), quantize_fp8(v_cache, v_scale)
    scale = 128**-0.5
    exact = paged_decode_attention_ref(query, k_cache, v_cache, tables, context_lens, scale)
    q = query.to(query_dtype)
    fp8 = paged_decode_attention_ref(q, k8, v8, tables, context_lens, scale, k_scale=k_scale, v_scale=v_scale)
    bf16 = paged_decode_attention_ref(
        query.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), tables, context_lens, scale
    )
    assert fp8.dtype == query_dtype
    error = relative_error(fp8, exact)
    print(
        f"\ndecode {query_dtype} {scales} scales: fp8 cache rel err {error:.2e} "
        f"(K {relative_error(k8.float() * k_scale, k_cache):.2e}, "
        f"bf16 cache and query {relative_error(bf16, exact):.2e})"
    )
    assert FP8_MIN_REL_ERROR < error < FP8_MAX_REL_ERROR


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_fp8_prefill_with_cached_prefix_stays_close_to_unquantized_attention(query_dtype):
    q_lens, prefixes = [100, 1, 37], [0, 300, 64]
    seq_lens = [p + n for p, n in zip(prefixes, q_lens)]
    k_cache, v_cache, tables, gen = paged_case(seq_lens, 4, 64, 16, 1.0, seed=3)  # MHA
    query = torch.randn(sum(q_lens), 4, 64, generator=gen)
    starts = [0, 100, 101, 138]
    k_scale, v_scale = calibrated(k_cache), calibrated(v_cache)
    k8, v8 = quantize_fp8(k_cache, k_scale), quantize_fp8(v_cache, v_scale)
    exact = paged_prefill_attention_ref(query, k_cache, v_cache, tables, starts, seq_lens, 0.125)
    fp8 = paged_prefill_attention_ref(
        query.to(query_dtype), k8, v8, tables, starts, seq_lens, 0.125, k_scale=k_scale, v_scale=v_scale
    )
    error = relative_error(fp8, exact)
    print(f"\nprefill {query_dtype}: fp8 cache rel err {error:.2e}")
    assert FP8_MIN_REL_ERROR < error < FP8_MAX_REL_ERROR


def test_scales_let_large_values_through():
    """K/V of magnitude ~300 overflow e4m3 at scale 1.0 (clamped at 448); a calibrated scale keeps them."""
    lens = [200, 90]
    k_cache, v_cache, tables, gen = paged_case(lens, 2, 64, 16, 300.0, seed=4)
    query = torch.randn(2, 4, 64, generator=gen) / 300
    context_lens = torch.tensor(lens, dtype=torch.int32)
    exact = paged_decode_attention_ref(query, k_cache, v_cache, tables, context_lens, 0.125)
    unit = paged_decode_attention_ref(
        query, quantize_fp8(k_cache, 1.0), quantize_fp8(v_cache, 1.0), tables, context_lens, 0.125
    )
    k_scale, v_scale = calibrated(k_cache), calibrated(v_cache)
    fitted = paged_decode_attention_ref(
        query,
        quantize_fp8(k_cache, k_scale),
        quantize_fp8(v_cache, v_scale),
        tables,
        context_lens,
        0.125,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    assert relative_error(unit, exact) > 0.1
    assert relative_error(fitted, exact) < FP8_MAX_REL_ERROR


# ---- the Attention layer ----


def layer_steps(block_size=16):
    """Three engine steps over sequences A, B, C: prefill A and B; decode A and B with the first chunk
    of C; decode A and B with C's last chunk over its cached prefix. Each step: (decode tokens
    [(seq, position)], prefill chunks [(seq, start, length)])."""
    tables = {"A": [3, 7], "B": [1, 9, 4], "C": [12, 0]}
    steps = [
        ([], [("A", 0, 20), ("B", 0, 37)]),
        ([("A", 20), ("B", 37)], [("C", 0, 20)]),
        ([("A", 21), ("B", 38)], [("C", 20, 12)]),
    ]
    return tables, steps


def step_metadata(tables, decodes, prefills, block_size, device):
    def slot(seq, pos):
        return tables[seq][pos // block_size] * block_size + pos % block_size

    width = max(len(t) for t in tables.values())

    def table_rows(names):
        rows = [tables[n] + [tables[n][0]] * (width - len(tables[n])) for n in names]
        return torch.tensor(rows, dtype=torch.int32, device=device).view(len(names), width)

    slots = [slot(s, p) for s, p in decodes] + [slot(s, b + i) for s, b, n in prefills for i in range(n)]
    starts = [0]
    for _, _, n in prefills:
        starts.append(starts[-1] + n)
    seq_lens = [b + n for _, b, n in prefills]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        num_decode_tokens=len(decodes),
        decode_block_tables=table_rows([s for s, _ in decodes]),
        decode_context_lens=torch.tensor([p + 1 for _, p in decodes], dtype=torch.int32, device=device),
        prefill_block_tables=table_rows([s for s, _, _ in prefills]),
        prefill_query_start_loc=starts,
        prefill_seq_lens=seq_lens,
        prefill_query_start_loc_t=torch.tensor(starts, dtype=torch.int32, device=device),
        prefill_seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_prefill_query_len=max((n for _, _, n in prefills), default=0),
    )


def run_layer(attn, cache_dtype, dtype, device, seed=5, block_size=16):
    """Runs the three steps on fresh caches; returns each step's output."""
    num_blocks = 16
    shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
    attn.k_cache = torch.zeros(shape, dtype=cache_dtype, device=device)
    attn.v_cache = torch.zeros(shape, dtype=cache_dtype, device=device)
    gen = torch.Generator().manual_seed(seed)
    tables, steps = layer_steps(block_size)
    outs = []
    for decodes, prefills in steps:
        meta = step_metadata(tables, decodes, prefills, block_size, device)
        num_tokens = meta.slot_mapping.shape[0]
        q = torch.randn(num_tokens, attn.num_heads, attn.head_dim, generator=gen).to(device, dtype)
        k = (torch.randn(num_tokens, attn.num_kv_heads, attn.head_dim, generator=gen) * 2).to(device, dtype)
        v = torch.randn(num_tokens, attn.num_kv_heads, attn.head_dim, generator=gen).to(device, dtype)
        outs.append(attn(q, k, v, meta))
    return outs


def test_attention_layer_fp8_cache_torch_ops():
    plain = Attention(8, 2, 64)
    assert plain.ops is TORCH_OPS and plain.k_scale == 1.0 and plain.v_scale == 1.0
    expected = run_layer(plain, torch.float32, torch.float32, "cpu")
    for k_scale, v_scale in ((1.0, 1.0), (0.02, 0.011)):
        attn = Attention(8, 2, 64)
        attn.k_scale, attn.v_scale = k_scale, v_scale
        outs = run_layer(attn, FP8_DTYPE, torch.float32, "cpu")
        # both scales are used on write and read: a dropped one would be off by a factor of 50 or more
        for out, ref in zip(outs, expected):
            assert FP8_MIN_REL_ERROR < relative_error(out, ref) < FP8_MAX_REL_ERROR
        assert (attn.k_cache.float().abs() * k_scale).max() < 20  # stored as x / scale


@needs_cuda
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.02, 0.011)], ids=["unit", "fitted"])
def test_cuda_attention_layer_fp8_triton_ops_match_torch_ops(scales):
    reference = Attention(32, 8, 128, ops=TORCH_OPS)
    triton_attn = Attention(32, 8, 128, ops=triton_ops_for_device())
    assert triton_attn.ops.name == "triton"
    for attn in (reference, triton_attn):
        attn.k_scale, attn.v_scale = scales
    expected = run_layer(reference, FP8_DTYPE, torch.bfloat16, "cuda")
    outs = run_layer(triton_attn, FP8_DTYPE, torch.bfloat16, "cuda")
    assert torch.equal(triton_attn.k_cache.view(torch.uint8), reference.k_cache.view(torch.uint8))
    assert torch.equal(triton_attn.v_cache.view(torch.uint8), reference.v_cache.view(torch.uint8))
    for out, ref in zip(outs, expected):
        assert out.dtype == torch.bfloat16
        assert relative_error(out, ref) < 1e-2  # bf16 roundings (P and the outputs), as in the kernel tests
