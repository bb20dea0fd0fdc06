"""The Triton paged decode attention kernel equals its torch reference.

Without CUDA the kernels run in the Triton interpreter on small CPU shapes. With CUDA the same small tests
run compiled on the GPU, plus real model shapes (run with ``-s`` to see the timing lines) and a CUDA graph
capture without host syncs. fp8 caches are filled by the reference quantizer (the interpreter's own
float -> fp8 conversion is wrong, see test_kernel_kv_cache_write.py; its fp8 loads and widening are exact).
"""

import pytest
import torch

from kernel_testing import DEVICE, INTERPRETED_FULL_ONLY, for_device, needs_cuda, relative_error
from pagetron.kernels import paged_decode_attention as pda
from pagetron.kernels.attention_ref import FP8_DTYPE, paged_decode_attention_ref, quantize_fp8

pda = for_device(pda)
assert pda._INTERPRETED == (DEVICE == "cpu")
UNPOISONED_ALLOC = pda._alloc_buffers


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """The output and split partials start as NaN, so anything the kernels fail to write shows."""
    alloc = pda._alloc_buffers

    def poisoned(*args):
        buffers = alloc(*args)
        for buffer in buffers:
            if buffer is not None:
                buffer.fill_(float("nan"))
        return buffers

    monkeypatch.setattr(pda, "_alloc_buffers", poisoned)


def make_case(context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed, pad_blocks=2):
    """Random query and caches; each sequence owns distinct blocks scattered through the cache.

    Tables get ``pad_blocks`` extra columns holding unrelated valid block ids (as the engine pads rows),
    and the table is a column slice of a wider tensor, so its rows are not contiguous.
    """
    gen = torch.Generator(DEVICE).manual_seed(seed)
    batch = len(context_lens)
    blocks_needed = [-(-n // block_size) for n in context_lens]
    max_blocks = max(blocks_needed) + pad_blocks
    num_blocks = sum(blocks_needed) + 3
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen, device=DEVICE, dtype=dtype)
    v_cache = torch.randn(cache_shape, generator=gen, device=DEVICE, dtype=dtype)
    query = torch.randn(batch, num_q_heads, head_dim, generator=gen, device=DEVICE, dtype=dtype)
    wide = torch.randint(
        0, num_blocks, (batch, max_blocks + 5), generator=gen, device=DEVICE, dtype=torch.int32
    )
    shuffled = torch.randperm(num_blocks, generator=gen, device=DEVICE, dtype=torch.int32)
    owned = shuffled[: sum(blocks_needed)].split(blocks_needed)
    for row, blocks in zip(wide, owned):
        row[: len(blocks)] = blocks
    tables = wide[:, :max_blocks]
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    return query, k_cache, v_cache, tables, lens


def reference_fp32(query, k_cache, v_cache, tables, lens, scale):
    return paged_decode_attention_ref(query.float(), k_cache.float(), v_cache.float(), tables, lens, scale)


# (num_q_heads, num_kv_heads, block_size, context_lens, pad_blocks). Context lens hold 1 token, a length
# that ends on a block boundary and one that does not; the last case fills its table to the last slot.
FP32_CASES = [
    (4, 4, 16, [1, 128, 203], 2),
    (4, 2, 32, [203, 1, 128], 2),
    (8, 1, 16, [128, 203, 1], 2),
    (4, 2, 128, [1, 256, 203], 0),  # cache blocks larger than the kernel's 64-token tile
]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,block_size,context_lens,pad_blocks", FP32_CASES)
def test_fp32_matches_reference_for_any_split_count(
    num_q_heads, num_kv_heads, block_size, context_lens, pad_blocks
):
    query, k_cache, v_cache, tables, lens = make_case(
        context_lens,
        num_q_heads,
        num_kv_heads,
        64,
        block_size,
        torch.float32,
        seed=block_size + num_q_heads,
        pad_blocks=pad_blocks,
    )
    expected = reference_fp32(query, k_cache, v_cache, tables, lens, 0.125)
    single = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125, num_splits=1)
    split = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125, num_splits=3)
    default = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125)
    assert single.dtype == torch.float32 and single.shape == query.shape
    # Exact fp32 arithmetic in another order: rounding only (seen ~2e-7).
    torch.testing.assert_close(single, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(split, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(default, expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(split, single, atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 2), (8, 1)])
def test_half_precision_matches_fp32_reference(dtype, num_q_heads, num_kv_heads):
    query, k_cache, v_cache, tables, lens = make_case(
        [203, 1, 128], num_q_heads, num_kv_heads, 64, 16, dtype, seed=7
    )
    expected = reference_fp32(query, k_cache, v_cache, tables, lens, 0.125)
    for num_splits in (1, 4):
        out = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125, num_splits=num_splits)
        assert out.dtype == dtype
        # Inputs are exact in fp32, so the error is two roundings to the half type (unit roundoff eps/2:
        # 2**-8 for bf16, 2**-11 for fp16): the softmax weights P before the P @ V product (as in
        # FlashAttention) and the output, each of a value bounded by max|V|. Seen: 2.6e-3 of a 3.5e-2
        # bound in bf16, 1.6e-4 of 4.4e-3 in fp16; relative (Frobenius) error 1e-3 and 5e-5.
        bound = torch.finfo(dtype).eps * v_cache.float().abs().max().item()
        torch.testing.assert_close(out.float(), expected, atol=bound, rtol=0)
        assert relative_error(out, expected) < 5e-3


def test_splits_without_work_leave_poisoned_partials_unread():
    # 8 splits over at most 2 tiles of 64 tokens: splits 2..7 never write their (NaN) partials.
    query, k_cache, v_cache, tables, lens = make_case([1, 5, 70], 8, 2, 64, 16, torch.float32, seed=3)
    out = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125, num_splits=8)
    expected = reference_fp32(query, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


def test_strided_views_of_fused_buffers():
    # The engine hands in query as a slice of the fused QKV output and the caches as views of one KV tensor.
    query, k_cache, v_cache, tables, lens = make_case([77, 128], 4, 2, 64, 16, torch.float32, seed=11)
    qkv = torch.randn(2, 4 + 2 * 2, 64, device=DEVICE)
    qkv[:, :4] = query
    kv = torch.randn(k_cache.shape[0], 16, 2, 2, 64, device=DEVICE)  # [blocks, block_size, K|V, Hkv, D]
    kv[:, :, 0], kv[:, :, 1] = k_cache, v_cache
    q_view, k_view, v_view = qkv[:, :4], kv[:, :, 0], kv[:, :, 1]
    assert not (q_view.is_contiguous() or k_view.is_contiguous())
    expected = reference_fp32(query, k_cache, v_cache, tables, lens, 0.3)
    for num_splits in (1, 2):
        out = pda.paged_decode_attention(q_view, k_view, v_view, tables, lens, 0.3, num_splits=num_splits)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


def test_empty_batch():
    query, k_cache, v_cache, tables, lens = make_case([5], 4, 2, 64, 16, torch.float32, seed=0)
    out = pda.paged_decode_attention(query[:0], k_cache, v_cache, tables[:0], lens[:0], 0.125)
    assert out.shape == (0, 4, 64)


# ---- fp8 (float8_e4m3fn) caches ----

# (k_scale, v_scale): vLLM's uncalibrated default, and scales fitted to the data below (K ~ 2 N(0, 1) and
# V ~ N(0, 1) stored as about 100 N(0, 1): e4m3's whole range, a few values clamped at 448)
# unit scales are the fitted scales' special case (1.0): the interpreter runs them under make test-full
_UNIT, _FITTED = [{"k_scale": 1.0, "v_scale": 1.0}, {"k_scale": 0.021, "v_scale": 0.0097}]
FP8_SCALES = [
    pytest.param(_UNIT, id="unit_scales", marks=INTERPRETED_FULL_ONLY),
    pytest.param(_FITTED, id="fitted_scales"),
]


def make_fp8_case(context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed, scales, **kw):
    """make_case's layout with fp8 caches quantized by the reference (scales: k_scale, v_scale); query in
    ``dtype``."""
    query, k_cache, v_cache, tables, lens = make_case(
        context_lens, num_q_heads, num_kv_heads, head_dim, block_size, torch.float32, seed, **kw
    )
    k_cache = quantize_fp8(2 * k_cache, scales["k_scale"])
    v_cache = quantize_fp8(v_cache, scales["v_scale"])
    return query.to(dtype), k_cache, v_cache, tables, lens


def reference_fp8(query, k_cache, v_cache, tables, lens, scale, scales):
    """The reference on the same fp8 caches, dequantized and computed in fp32."""
    return paged_decode_attention_ref(query.float(), k_cache, v_cache, tables, lens, scale, **scales)


@pytest.mark.parametrize("scales", FP8_SCALES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,block_size,context_lens,pad_blocks", FP32_CASES)
def test_fp8_cache_fp32_query_matches_reference_for_any_split_count(
    num_q_heads, num_kv_heads, block_size, context_lens, pad_blocks, scales
):
    seed = block_size + num_q_heads
    query, k_cache, v_cache, tables, lens = make_fp8_case(
        context_lens,
        num_q_heads,
        num_kv_heads,
        64,
        block_size,
        torch.float32,
        seed,
        scales,
        pad_blocks=pad_blocks,
    )
    assert k_cache.dtype == FP8_DTYPE
    expected = reference_fp8(query, k_cache, v_cache, tables, lens, 0.125, scales)
    single = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125, num_splits=1, **scales)
    split = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125, num_splits=3, **scales)
    default = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125, **scales)
    assert single.dtype == torch.float32 and single.shape == query.shape
    # The same fp32 values (the kernel folds the scales): rounding only, as in the fp32 test above.
    for out in (single, split, default):
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("scales", FP8_SCALES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_fp8_cache_half_query_matches_reference(num_q_heads, num_kv_heads, dtype, scales):
    query, k_cache, v_cache, tables, lens = make_fp8_case(
        [203, 1, 128], num_q_heads, num_kv_heads, 64, 32, dtype, 9, scales
    )
    expected = reference_fp8(query, k_cache, v_cache, tables, lens, 0.125, scales)
    max_v = v_cache.float().abs().max().item() * scales["v_scale"]
    for num_splits in (1, 4):
        out = pda.paged_decode_attention(
            query, k_cache, v_cache, tables, lens, 0.125, num_splits=num_splits, **scales
        )
        assert out.dtype == dtype
        # e4m3 -> bf16/fp16 is exact, so as in the half-precision test above: the roundings of P and of
        # the output to the half type.
        torch.testing.assert_close(out.float(), expected, atol=torch.finfo(dtype).eps * max_v, rtol=0)
        assert relative_error(out, expected) < 5e-3


def test_fp8_cache_splits_without_work_and_strided_caches():
    # K and V as views of one fp8 KV tensor; 8 splits over one tile each leave most partials unwritten.
    scales = {"k_scale": 0.5, "v_scale": 0.25}
    query, k_cache, v_cache, tables, lens = make_fp8_case([1, 5, 70], 8, 2, 64, 16, torch.float32, 3, scales)
    kv = torch.empty(k_cache.shape[0], 16, 2, 2, 64, device=DEVICE, dtype=FP8_DTYPE)
    kv[:, :, 0], kv[:, :, 1] = k_cache, v_cache
    k_view, v_view = kv[:, :, 0], kv[:, :, 1]
    assert not k_view.is_contiguous()
    out = pda.paged_decode_attention(query, k_view, v_view, tables, lens, 0.125, num_splits=8, **scales)
    expected = reference_fp8(query, k_cache, v_cache, tables, lens, 0.125, scales)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "batch,num_kv_heads,max_context_len,expected",
    [
        (1, 40, 4096, 14),  # Llama-2-13B, batch 1: 528 / 40 programs wanted
        (8, 40, 4096, 2),
        (32, 40, 4096, 1),  # 1280 programs already fill 132 SMs
        (256, 8, 4096, 1),
        (1, 8, 256, 2),  # capped: a split gets at least 128 tokens
        (1, 1, 1 << 20, 64),  # capped at _MAX_SPLITS
    ],
)
def test_default_num_splits(batch, num_kv_heads, max_context_len, expected):
    assert pda.default_num_splits(batch, num_kv_heads, max_context_len, num_sms=132) == expected


def bad_inputs(**change):
    query, k_cache, v_cache, tables, lens = make_case([20, 40], 4, 2, 64, 16, torch.float32, seed=0)
    args = dict(
        query=query, k_cache=k_cache, v_cache=v_cache, block_tables=tables, context_lens=lens, scale=0.1
    )
    return args | {name: make(args) for name, make in change.items()}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"v_cache": lambda a: a["v_cache"][:-1]}, "differ in shape"),
        (
            {
                "k_cache": lambda a: a["k_cache"].repeat(1, 3, 1, 1)[:, :24],
                "v_cache": lambda a: a["v_cache"].repeat(1, 3, 1, 1)[:, :24],
            },
            "block_size must be a power of two",
        ),
        (
            {
                "query": lambda a: a["query"][..., :48],
                "k_cache": lambda a: a["k_cache"][..., :48],
                "v_cache": lambda a: a["v_cache"][..., :48],
            },
            "head_dim must be a power of two",
        ),
        ({"query": lambda a: a["query"][:, :3]}, "not a multiple of num_kv_heads"),
        ({"query": lambda a: a["query"].half()}, "share one dtype"),
        ({"k_cache": lambda a: a["k_cache"].to(FP8_DTYPE)}, "share one dtype"),  # v_cache stays fp32
        ({"k_scale": lambda a: 0.5}, "fp8 caches only"),
        (
            {
                "k_cache": lambda a: a["k_cache"].to(FP8_DTYPE),
                "v_cache": lambda a: a["v_cache"].to(FP8_DTYPE),
                "v_scale": lambda a: -1.0,
            },
            "bad scales",
        ),
        ({"block_tables": lambda a: a["block_tables"].long()}, "must be int32"),
        ({"context_lens": lambda a: a["context_lens"][:1]}, r"context_lens \[2\]"),
    ],
)
def test_invalid_inputs_are_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        pda.paged_decode_attention(**bad_inputs(**change))


# ---- CUDA only: real shapes, timing, graph capture ----

MODEL_SHAPES = {"llama2-13b": (40, 40, 128), "llama3-8b": (32, 8, 128)}


def reference_fp32_chunked(query, k_cache, v_cache, tables, lens, scale, chunk=16, **scales):
    """fp32 reference over a few sequences at a time: upcasting the whole cache would not fit.

    fp8 caches stay fp8 (the reference dequantizes them with the scales to the fp32 query's dtype).
    """
    outs = []
    for start in range(0, query.shape[0], chunk):
        rows = tables[start : start + chunk].long()
        used = rows.flatten()
        local = torch.arange(used.numel(), device=rows.device, dtype=torch.int32).view(rows.shape)
        keys, values = k_cache[used], v_cache[used]
        if keys.dtype != FP8_DTYPE:
            keys, values = keys.float(), values.float()
        outs.append(
            paged_decode_attention_ref(
                query[start : start + chunk].float(),
                keys,
                values,
                local,
                lens[start : start + chunk],
                scale,
                **scales,
            )
        )
    return torch.cat(outs)


def random_lens(batch, max_len, seed):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=gen)
    lens[0] = max_len
    if batch > 1:
        lens[1] = 1
    return lens.tolist()


@needs_cuda
@pytest.mark.parametrize("batch", [1, 32, 256])
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_cuda_model_shapes_bf16(model, batch, monkeypatch):
    import triton

    num_q_heads, num_kv_heads, head_dim = MODEL_SHAPES[model]
    context_lens = random_lens(batch, 4096, seed=batch)
    query, k_cache, v_cache, tables, lens = make_case(
        context_lens, num_q_heads, num_kv_heads, head_dim, 16, torch.bfloat16, seed=batch
    )
    scale = head_dim**-0.5
    expected = reference_fp32_chunked(query, k_cache, v_cache, tables, lens, scale)
    out = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, scale)
    single = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, scale, num_splits=1)
    # METHOD.md: bf16 operands land between 1e-3 and 1e-2 in ||out - ref|| / ||ref||; NaN never passes.
    # Here it is the bf16 rounding of P (before P @ V) and of the output: about 4e-3 seen on CPU.
    error = relative_error(out, expected)
    assert error < 1e-2
    assert relative_error(single, expected) < 1e-2

    monkeypatch.setattr(pda, "_alloc_buffers", UNPOISONED_ALLOC)  # time without the NaN fill
    run = lambda: pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, scale)
    graph_ms = triton.testing.do_bench_cudagraph(run, return_mode="median")  # GPU time, no launch gaps
    eager_ms = triton.testing.do_bench(run, return_mode="median")  # includes Python launch overhead
    ref_ms = triton.testing.do_bench(
        lambda: paged_decode_attention_ref(query, k_cache, v_cache, tables, lens, scale),
        warmup=5,
        rep=20,
        return_mode="median",
    )
    num_splits = pda.default_num_splits(batch, num_kv_heads, tables.shape[1] * 16, pda._num_sms(query.device))
    kv_bytes = sum(context_lens) * num_kv_heads * head_dim * 2 * k_cache.element_size()
    print(
        f"\n{model} B={batch} splits={num_splits} rel_err={error:.1e}: kernel {graph_ms * 1e3:.1f} us in a "
        f"graph ({kv_bytes / graph_ms / 1e9:.0f} GB/s of K/V), {eager_ms * 1e3:.1f} us eager; "
        f"torch ref {ref_ms * 1e3:.1f} us ({ref_ms / graph_ms:.1f}x)"
    )


@needs_cuda
def test_cuda_graph_replay_without_host_sync():
    query, k_cache, v_cache, tables, lens = make_case(
        [300, 1, 1000, 64], 32, 8, 128, 16, torch.bfloat16, seed=5, pad_blocks=10
    )
    pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.088)  # compile outside the capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.088)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.088)
    # New values in the captured input buffers, including longer and shorter contexts.
    query.copy_(torch.randn_like(query))
    lens.copy_(torch.tensor([17, 555, 1, 1100], dtype=torch.int32))
    graph.replay()
    expected = reference_fp32(query, k_cache, v_cache, tables, lens, 0.088)
    assert relative_error(out, expected) < 1e-2


@needs_cuda
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_cuda_fp8_model_shapes(model):
    """fp8 caches on the real head layouts, batch 64, contexts up to 2000 tokens: split and single-pass
    kernels against the fp32 reference on the same fp8 data (no timings here)."""
    num_q_heads, num_kv_heads, head_dim = MODEL_SHAPES[model]
    context_lens = random_lens(64, 2000, seed=64)
    scales = _FITTED
    query, k_cache, v_cache, tables, lens = make_fp8_case(
        context_lens, num_q_heads, num_kv_heads, head_dim, 16, torch.bfloat16, 64, scales
    )
    scale = head_dim**-0.5
    expected = reference_fp32_chunked(query, k_cache, v_cache, tables, lens, scale, **scales)
    num_splits = pda.default_num_splits(64, num_kv_heads, tables.shape[1] * 16, pda._num_sms(query.device))
    for splits in sorted({num_splits, 1, 4}):
        out = pda.paged_decode_attention(
            query, k_cache, v_cache, tables, lens, scale, num_splits=splits, **scales
        )
        assert out.dtype == torch.bfloat16 and not out.isnan().any()
        # the bf16 roundings of P and of the output, as in test_cuda_model_shapes_bf16
        assert relative_error(out, expected) < 1e-2, splits


@needs_cuda
def test_cuda_fp8_graph_replay_without_host_sync():
    scales = {"k_scale": 0.02, "v_scale": 0.01}
    query, k_cache, v_cache, tables, lens = make_fp8_case(
        [300, 1, 1000, 64], 32, 8, 128, 16, torch.bfloat16, 5, scales, pad_blocks=10
    )
    pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.088, **scales)  # compile first
    torch.cuda.set_sync_debug_mode("error")
    try:
        pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.088, **scales)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pda.paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.088, **scales)
    query.copy_(torch.randn_like(query))
    lens.copy_(torch.tensor([17, 555, 1, 1100], dtype=torch.int32))
    graph.replay()
    expected = reference_fp8(query, k_cache, v_cache, tables, lens, 0.088, scales)
    assert relative_error(out, expected) < 1e-2
