"""The Triton KV-cache write equals the torch reference and skips padded (negative) slots."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernel on CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from pagetron.kernels.attention_ref import write_kv_cache_ref  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_matches_reference_and_skips_padding(dtype):
    from pagetron.kernels.kv_cache_write import write_kv_cache

    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, hkv, d = 6, 16, 2, 64
    # k and v come out of one fused qkv projection: views with a row stride larger than Hkv * D
    qkv = torch.randn(7, 4 * d + 2 * hkv * d, generator=gen).to(dtype)
    key = qkv[:, 4 * d : 4 * d + hkv * d].view(7, hkv, d)
    value = qkv[:, 4 * d + hkv * d :].view(7, hkv, d)
    slots = torch.tensor([17, 3, -1, 95, 40, -1, 0])
    caches = [torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    write_kv_cache_ref(key, value, expected[0], expected[1], slots)
    write_kv_cache(key, value, caches[0], caches[1], slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    assert torch.equal(caches[0].view(-1, hkv, d)[95], key[3])
