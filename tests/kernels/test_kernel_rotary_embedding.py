"""The Triton rotary kernel rotates q and k in place as the torch reference does, rounding once.

Without CUDA the kernel runs in the Triton interpreter on small CPU shapes. The interpreter (triton 3.9)
truncates fp32 -> bf16 casts where the GPU rounds to nearest even (cvt.rn); conftest.py makes it round as
the GPU does. With CUDA the same small tests run compiled on the GPU, plus the Llama-2-13B and Llama-3-8B
shapes (q and k views of a [8192, 15360] / [8192, 6144] qkv output; run with ``-s`` for the timing lines)
and a CUDA graph capture.

Numerics: the kernel computes round(x1 * cos - x2 * sin) in fp32. In the interpreter that is bit for bit
the fp32 reference rounded once to the dtype; compiled, a fused multiply-add may move the fp32 value by an
ulp (rarely one bf16 step). The torch layer in bf16 also rounds cos / sin and each product: the kernel is
within 1e-2 relative of it, and closer than it to exact rotation.
"""

import pytest
import torch

from kernel_testing import DEVICE, for_device, needs_cuda, relative_error, triton_ops_for_device
from pagetron.backend.model.kernel_ops import TORCH_OPS
from pagetron.backend.model.layers.rotary import RotaryEmbedding
from pagetron.kernels import rotary_embedding as kernel_module
from pagetron.kernels.layers_ref import apply_rotary_ref

apply_rotary = for_device(kernel_module).apply_rotary


def assert_rounded_once(out: torch.Tensor, exact: torch.Tensor) -> float:
    """out is ``exact`` (fp32) rounded once to out's dtype: bit for bit in the interpreter. Compiled, an
    FMA may move the fp32 value first, by an fp32 ulp of the products: where x1 * cos and x2 * sin nearly
    cancel that is many ulps of the small result, hence an absolute bound too. Returns the fraction of
    elements that differ from the rounded reference."""
    rounded = exact.to(out.dtype)
    mismatches = (out != rounded).float().mean().item()
    if DEVICE == "cpu":
        assert torch.equal(out, rounded)
    elif out.dtype == torch.float32:
        torch.testing.assert_close(out, rounded, rtol=1e-6, atol=1e-6)
    else:  # within one rounding step (2**-8 relative) of exact, rarely not the nearest value
        torch.testing.assert_close(out.float(), exact, rtol=2**-8, atol=1e-5)
        assert mismatches < 1e-2
    return mismatches


class Qkv:
    """q and k as views of one fused qkv output [T, (Hq + 2 Hkv) * D + pad], as LlamaAttention makes."""

    def __init__(self, num_tokens, num_heads, num_kv_heads, head_dim, dtype, gen, pad=8):
        self.shape = (num_heads, num_kv_heads, head_dim)
        width = (num_heads + 2 * num_kv_heads) * head_dim + pad
        self.data = (torch.randn(num_tokens, width, generator=gen) * 2).to(DEVICE, dtype)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.q = self.data[:, :q_size].view(num_tokens, num_heads, head_dim)
        self.k = self.data[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
        self.rest = self.data[:, q_size + kv_size :]  # v and the padding: never written


def caches(kind, head_dim, max_position, gen):
    if kind == "random":  # halves that differ: the kernel must read both
        return tuple((torch.rand(max_position, head_dim, generator=gen) * 2 - 1).to(DEVICE) for _ in range(2))
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    rotary = RotaryEmbedding(head_dim, max_position, 10000.0, scaling if kind == "yarn" else None)
    return rotary.cos_cache.to(DEVICE), rotary.sin_cache.to(DEVICE)


HEAD_LAYOUTS = [(4, 4, 16), (4, 2, 64), (8, 1, 128), (6, 2, 80), (40, 8, 64)]  # (Hq, Hkv, D)
CACHES = ["rope", "yarn", "random"]


@pytest.mark.parametrize("cache_kind", CACHES)
@pytest.mark.parametrize("layout", HEAD_LAYOUTS, ids=lambda h: f"hq{h[0]}_hkv{h[1]}_d{h[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rotates_in_place_like_the_reference(dtype, layout, cache_kind):
    num_heads, num_kv_heads, head_dim = layout
    gen = torch.Generator().manual_seed(head_dim + num_heads)
    qkv = Qkv(5, num_heads, num_kv_heads, head_dim, dtype, gen)
    cos, sin = caches(cache_kind, head_dim, 64, gen)
    positions = torch.tensor([63, 0, 17, 17, 40], device=DEVICE)  # unsorted, repeated, both ends
    rest_before = qkv.rest.clone()
    exact_q, exact_k = apply_rotary_ref(positions, qkv.q.float(), qkv.k.float(), cos, sin)
    torch_q, torch_k = apply_rotary_ref(positions, qkv.q, qkv.k, cos, sin)

    q, k = apply_rotary(positions, qkv.q, qkv.k, cos, sin)
    assert q is qkv.q and k is qkv.k
    assert torch.equal(qkv.rest, rest_before), "v and the padding columns must stay as they were"
    assert_rounded_once(q, exact_q)
    assert_rounded_once(k, exact_k)
    if dtype != torch.float32:  # the torch layer rounds more often: close, and further from exact
        for ours, torchs, exact in ((q, torch_q, exact_q), (k, torch_k, exact_k)):
            assert relative_error(ours, torchs) < 1e-2
            assert relative_error(ours, exact) <= relative_error(torchs, exact)


@pytest.mark.parametrize("positions_dtype", [torch.int64, torch.int32], ids=str)
def test_position_dtypes_and_no_tokens(positions_dtype):
    gen = torch.Generator().manual_seed(1)
    qkv = Qkv(4, 4, 2, 32, torch.float32, gen)
    cos, sin = caches("rope", 32, 16, gen)
    positions = torch.tensor([3, 15, 0, 9], dtype=positions_dtype, device=DEVICE)
    exact = apply_rotary_ref(positions, qkv.q, qkv.k, cos, sin)
    for out, ref in zip(apply_rotary(positions, qkv.q, qkv.k, cos, sin), exact):
        assert_rounded_once(out, ref)
    empty_q, empty_k = torch.empty(0, 4, 32, device=DEVICE), torch.empty(0, 2, 32, device=DEVICE)
    none = torch.empty(0, dtype=positions_dtype, device=DEVICE)
    assert apply_rotary(none, empty_q, empty_k, cos, sin)[0] is empty_q


def old_rotary_forward(rotary, positions, q, k):
    """RotaryEmbedding.forward before the kernels (frozen copy)."""
    cos = rotary.cos_cache[positions].unsqueeze(1).to(q.dtype)
    sin = rotary.sin_cache[positions].unsqueeze(1).to(q.dtype)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_ops(dtype):
    """Built with the torch ops (the default), the layer is the old layer code bit for bit (and leaves q
    and k alone); built with the triton ops, it is the kernel."""
    gen = torch.Generator().manual_seed(2)
    rotary = RotaryEmbedding(64, 128, 500000.0).to(DEVICE)
    qkv = Qkv(6, 4, 2, 64, dtype, gen)
    positions = torch.tensor([0, 1, 2, 100, 127, 5], device=DEVICE)
    before = qkv.data.clone()
    expected = old_rotary_forward(rotary, positions, qkv.q, qkv.k)
    assert rotary.ops is TORCH_OPS
    for got, want in zip(rotary(positions, qkv.q, qkv.k), expected):
        assert torch.equal(got, want)
    assert torch.equal(qkv.data, before)
    exact = apply_rotary_ref(positions, qkv.q.float(), qkv.k.float(), rotary.cos_cache, rotary.sin_cache)
    rotary = RotaryEmbedding(64, 128, 500000.0, ops=triton_ops_for_device()).to(DEVICE)
    assert rotary.ops.name == "triton"
    q, k = rotary(positions, qkv.q, qkv.k)
    assert q is qkv.q and k is qkv.k
    assert_rounded_once(q, exact[0])
    assert_rounded_once(k, exact[1])


# ---- CUDA only: real shapes, graph capture ----

MODEL_SHAPES = {"llama2_13b": (40, 40, 128), "llama3_8b": (32, 8, 128)}  # qkv widths 15360 and 6144


@needs_cuda
@pytest.mark.parametrize("model", MODEL_SHAPES)
def test_cuda_real_shapes_match_reference(model):
    import triton.testing

    num_heads, num_kv_heads, head_dim = MODEL_SHAPES[model]
    gen = torch.Generator().manual_seed(3)
    num_tokens, max_position = 8192, 8192
    qkv = Qkv(num_tokens, num_heads, num_kv_heads, head_dim, torch.bfloat16, gen, pad=0)
    assert qkv.data.shape[1] == (num_heads + 2 * num_kv_heads) * head_dim
    cos, sin = caches("rope", head_dim, max_position, gen)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen).to(DEVICE)
    rest_before = qkv.rest.clone()
    exact_q, exact_k = apply_rotary_ref(positions, qkv.q.float(), qkv.k.float(), cos, sin)
    torch_q, torch_k = apply_rotary_ref(positions, qkv.q, qkv.k, cos, sin)
    apply_rotary(positions, qkv.q, qkv.k, cos, sin)
    assert torch.equal(qkv.rest, rest_before)
    mismatches = assert_rounded_once(qkv.q, exact_q)
    assert_rounded_once(qkv.k, exact_k)
    error = relative_error(qkv.q, torch_q)
    assert error < 1e-2

    kernel_ms = triton.testing.do_bench(lambda: apply_rotary(positions, qkv.q, qkv.k, cos, sin))
    ref_ms = triton.testing.do_bench(lambda: apply_rotary_ref(positions, qkv.q, qkv.k, cos, sin))
    tbytes = 2 * num_tokens * (num_heads + num_kv_heads) * head_dim * 2 / 1e12  # q and k read and written
    print(
        f"\nrotary {model} [{num_tokens} tokens] bf16: rel diff to the torch layer {error:.1e}, "
        f"{mismatches:.1e} of q not the nearest bf16 of exact; "
        f"triton {kernel_ms:.3f} ms ({tbytes / kernel_ms * 1e3:.1f} TB/s), torch {ref_ms:.3f} ms "
        f"({ref_ms / kernel_ms:.1f}x)"
    )


@needs_cuda
def test_cuda_graph_capture():
    gen = torch.Generator().manual_seed(4)
    qkv = Qkv(170, 40, 40, 128, torch.bfloat16, gen, pad=0)
    cos, sin = caches("rope", 128, 4096, gen)
    positions = torch.randint(0, 4096, (170,), generator=gen).to(DEVICE)
    apply_rotary(positions, qkv.q, qkv.k, cos, sin)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        apply_rotary(positions, qkv.q, qkv.k, cos, sin)
    qkv.data.copy_(torch.randn_like(qkv.data))
    positions.copy_(torch.randint(0, 4096, (170,), device=DEVICE))
    exact_q, exact_k = apply_rotary_ref(positions, qkv.q.float(), qkv.k.float(), cos, sin)
    graph.replay()
    assert_rounded_once(qkv.q, exact_q)
    assert_rounded_once(qkv.k, exact_k)
