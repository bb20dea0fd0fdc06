"""The Triton KV-cache write equals the torch reference and skips padded (negative) slots.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors; with CUDA it runs compiled on the
GPU, plus a real model shape and a CUDA graph capture (fp8 caches).

fp8 caches: the interpreter (triton 3.9) loads and stores float8e4nv bytes and widens every finite one
exactly (it reads the NaN pattern 0x7f as 480), but its fp32 -> float8e4nv conversion is wrong: ties
round away from zero instead of to even; a mantissa carry into an odd exponent is lost (0.0302734375
becomes 0.015625, half the right value); results below e4m3's smallest normal (2**-6) are truncated, not
rounded; NaN does not stay NaN. The interpreted tests therefore replace that one conversion with torch's
(round to nearest even, as the GPU's cvt.rn); the CUDA tests check the real conversion byte for byte.
"""

import math

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

from kernel_testing import DEVICE, for_device, needs_cuda
from pagetron.kernels import kv_cache_write as kernel_module
from pagetron.kernels.attention_ref import FP8_DTYPE, FP8_MAX, quantize_fp8, write_kv_cache_ref

write_kv_cache = for_device(kernel_module).write_kv_cache


def _fp8_conversion_as_torch(create_fp_to_fp):
    """The interpreter's float -> float8e4nv conversion, done by torch (see the module docstring)."""

    def patched(self, src, dst_type, rounding_mode):
        if dst_type.scalar != interpreter.tl.float8e4nv:
            return create_fp_to_fp(self, src, dst_type, rounding_mode)
        assert rounding_mode == interpreter._ir.ROUNDING_MODE.RTNE, "the kernel asks for rtne"
        data = np.ascontiguousarray(src.data)
        if src.dtype == interpreter.tl.bfloat16:  # stored as uint16 bit patterns
            values = (data.astype(np.uint32) << 16).view(np.float32)
        else:
            values = data.astype(np.float32)  # fp16 / fp32: exact
        fp8 = torch.from_numpy(values).to(FP8_DTYPE).view(torch.uint8).numpy()
        return interpreter.TensorHandle(fp8, dst_type.scalar)

    return patched


@pytest.fixture(scope="module", autouse=True)
def interpreter_fp8_conversion():
    with pytest.MonkeyPatch.context() as mp:
        builder = interpreter.InterpreterBuilder
        mp.setattr(builder, "create_fp_to_fp", _fp8_conversion_as_torch(builder.create_fp_to_fp))
        yield


def fused_kv(num_tokens, num_kv_heads, head_dim, dtype, gen, magnitude=1.0):
    """k and v as they come out of one fused qkv projection: views with a row stride larger than Hkv * D."""
    width = 4 * head_dim + 2 * num_kv_heads * head_dim
    qkv = (torch.randn(num_tokens, width, generator=gen) * magnitude).to(DEVICE, dtype)
    kv_width = num_kv_heads * head_dim
    key = qkv[:, 4 * head_dim : 4 * head_dim + kv_width].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 4 * head_dim + kv_width :].view(num_tokens, num_kv_heads, head_dim)
    return key, value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_matches_reference_and_skips_padding(dtype):
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, hkv, d = 6, 16, 2, 64
    key, value = fused_kv(7, hkv, d, dtype, gen)
    slots = torch.tensor([17, 3, -1, 95, 40, -1, 0], device=DEVICE)
    caches = [torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(DEVICE, dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    write_kv_cache_ref(key, value, expected[0], expected[1], slots)
    write_kv_cache(key, value, caches[0], caches[1], slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    assert torch.equal(caches[0].view(-1, hkv, d)[95], key[3])


def random_fp8_caches(num_blocks, block_size, num_kv_heads, head_dim, gen):
    """fp8 caches holding random bytes (NaN patterns excluded), so any slot written shows."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = []
    for _ in range(2):
        raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32)
        raw[(raw & 0x7F) == 0x7F] = 0x11
        caches.append(raw.to(torch.uint8).view(FP8_DTYPE).to(DEVICE))
    return caches


def as_bytes(cache):
    return cache.view(torch.uint8)


# (k_scale, v_scale): the uncalibrated default, powers of two, and scales with inexact reciprocals
FP8_SCALES = [(1.0, 1.0), (0.25, 2.0), (0.037, 0.3)]


@pytest.mark.parametrize("k_scale,v_scale", FP8_SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_write_stores_the_reference_bytes(dtype, k_scale, v_scale):
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, hkv, d = 6, 16, 2, 64
    # |x| / scale spans e4m3's subnormals (< 2**-6) up to well past 448 (clamped)
    key, value = fused_kv(9, hkv, d, dtype, gen, magnitude=40 * k_scale)
    value.mul_(v_scale / k_scale)
    key[4, 0, :3] = torch.tensor([1e4, -1e4, 600.0 * k_scale], dtype=dtype)
    slots = torch.tensor([17, 3, -1, 95, 40, -1, 0, 50, 51], device=DEVICE)
    caches = random_fp8_caches(num_blocks, block_size, hkv, d, gen)
    before = [as_bytes(c).clone() for c in caches]
    expected = [c.clone() for c in caches]
    write_kv_cache_ref(key, value, *expected, slots, k_scale, v_scale)
    write_kv_cache(key, value, *caches, slots, k_scale, v_scale)
    for cache, ref, old in zip(caches, expected, before):
        assert torch.equal(as_bytes(cache), as_bytes(ref))
        # only the slots of real tokens changed; padding tokens (slot -1) wrote nothing
        changed = (as_bytes(cache) != old).flatten(2).any(-1).flatten()
        assert set(changed.nonzero().flatten().tolist()) <= {17, 3, 95, 40, 0, 50, 51}
    rows = caches[0].view(-1, hkv, d)
    assert torch.equal(as_bytes(rows[95]), as_bytes(quantize_fp8(key[3], k_scale)))
    assert rows[40, 0, :3].float().tolist() == [FP8_MAX, -FP8_MAX, FP8_MAX]  # clamped, never NaN
    assert not caches[0].float().isnan().any() and not caches[1].float().isnan().any()


def test_fp8_write_keeps_nan():
    """A NaN key stays NaN in the cache (the clamp does not hide it), as in the reference."""
    gen = torch.Generator().manual_seed(2)
    key, value = fused_kv(2, 1, 16, torch.float32, gen)
    key[1, 0, 5] = float("nan")
    caches = random_fp8_caches(2, 16, 1, 16, gen)
    expected = [c.clone() for c in caches]
    slots = torch.tensor([3, 20], device=DEVICE)
    write_kv_cache_ref(key, value, *expected, slots)
    write_kv_cache(key, value, *caches, slots)
    nan = caches[0].float().isnan()  # its sign bit may differ; every other byte must not
    assert nan.sum() == 1 and nan.view(-1, 1, 16)[20, 0, 5] and expected[0].float().isnan()[nan].all()
    assert torch.equal(as_bytes(caches[0])[~nan], as_bytes(expected[0])[~nan])


def test_scales_other_than_one_need_fp8_caches():
    key = torch.randn(2, 1, 16, device=DEVICE)
    cache = torch.zeros(1, 16, 1, 16, device=DEVICE)
    slots = torch.tensor([0, 1], device=DEVICE)
    for write in (write_kv_cache, write_kv_cache_ref):
        with pytest.raises(AssertionError, match="fp8 caches only"):
            write(key, key, cache, cache.clone(), slots, 0.5, 1.0)
        with pytest.raises(AssertionError, match="bad scales"):
            write(key, key, cache.to(FP8_DTYPE), cache.to(FP8_DTYPE), slots, 1.0, 0.0)


# ---- CUDA only: real shapes, graph capture ----


@needs_cuda
@pytest.mark.parametrize("num_kv_heads", [40, 8], ids=["llama2_13b", "llama3_8b"])
def test_cuda_fp8_write_real_shape_bytes_equal_reference(num_kv_heads):
    gen = torch.Generator().manual_seed(3)
    num_tokens, head_dim, block_size, num_blocks = 4096, 128, 16, 400
    k_scale, v_scale = 0.0123, 0.71  # reciprocals that are not exact
    key, value = fused_kv(num_tokens, num_kv_heads, head_dim, torch.bfloat16, gen, magnitude=3.0)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    slots[::7] = -1
    caches = random_fp8_caches(num_blocks, block_size, num_kv_heads, head_dim, gen)
    expected = [c.clone() for c in caches]
    write_kv_cache_ref(key, value, *expected, slots, k_scale, v_scale)
    write_kv_cache(key, value, *caches, slots, k_scale, v_scale)
    assert torch.equal(as_bytes(caches[0]), as_bytes(expected[0]))
    assert torch.equal(as_bytes(caches[1]), as_bytes(expected[1]))
    assert (caches[0].float().abs() == FP8_MAX).any(), "some keys should have been clamped"


@needs_cuda
def test_cuda_fp8_write_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(4)
    key, value = fused_kv(64, 8, 128, torch.bfloat16, gen)
    slots = torch.arange(64, device=DEVICE) * 3
    caches = random_fp8_caches(16, 16, 8, 128, gen)
    write_kv_cache(key, value, *caches, slots, 0.5, 0.125)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        write_kv_cache(key, value, *caches, slots, 0.5, 0.125)
    key.copy_(torch.randn_like(key))
    slots.copy_(torch.randperm(256, device=DEVICE)[:64])
    slots[:5] = -1
    expected = [c.clone() for c in caches]
    write_kv_cache_ref(key, value, *expected, slots, 0.5, 0.125)
    graph.replay()
    assert torch.equal(as_bytes(caches[0]), as_bytes(expected[0]))
    assert torch.equal(as_bytes(caches[1]), as_bytes(expected[1]))
    assert math.isfinite(caches[0].float().abs().max().item())


@needs_cuda
def test_cuda_fp8_write_rounds_like_the_reference_at_ties_and_clamps():
    """Every midpoint between neighbouring e4m3 values, the fp32 numbers next to it, and overflows."""
    codes = torch.arange(0x7F, dtype=torch.int32).to(torch.uint8)  # +0 .. 448
    grid = codes.view(FP8_DTYPE).float()
    mid = (grid[:-1] + grid[1:]) / 2
    ties = torch.cat([mid, torch.nextafter(mid, grid[1:]), torch.nextafter(mid, grid[:-1]), grid])
    extra = torch.tensor([449.0, 464.0, 480.0, 1e30, float("inf")])
    values = torch.cat([ties, -ties, extra, -extra])
    row = 2 * 128
    values = torch.cat([values, torch.zeros(-values.numel() % row)]).view(-1, 2, 128).to(DEVICE)
    slots = torch.arange(values.shape[0], device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        key = values.to(dtype)
        caches = [torch.zeros(1, values.shape[0], 2, 128, dtype=FP8_DTYPE, device=DEVICE) for _ in range(2)]
        expected = [c.clone() for c in caches]
        write_kv_cache_ref(key, key, *expected, slots)
        write_kv_cache(key, key, *caches, slots)
        assert torch.equal(as_bytes(caches[0]), as_bytes(expected[0])), dtype
