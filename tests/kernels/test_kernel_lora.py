"""The batched LoRA kernels (shrink and expand over per-row adapter slots) equal their torch reference.

Without CUDA they run in the Triton interpreter on small shapes: rows of three adapters and of none
(slot -1) mixed in one call, three fused parts (q | k | v) of uneven widths, a rank below the block width
and an input width that is not a multiple of the K block. The shrink accumulates in fp32 as the reference
does (fp32: to 1e-5 relative; bf16: to the reference's fp32 sums within 1e-2); the expand's add into
``y`` rounds once, as the reference's; rows without an adapter are left bit-identical. With CUDA the
kernels also run inside a captured graph whose slot buffer changes between replays.
"""

import pytest
import torch

from kernel_testing import DEVICE, for_device, needs_cuda
from pagetron.kernels import lora as kernel_module
from pagetron.kernels.lora_ref import lora_expand_ref, lora_shrink_ref

lora = for_device(kernel_module)

SLOTS, RANK, IN = 3, 6, 200
PART_WIDTHS = [40, 16, 24]  # q | k | v of a fused projection
TOKEN_SLOTS = [-1, 0, 2, 0, -1, 1, 2, 2]


def weights(dtype, gen):
    parts = len(PART_WIDTHS)
    a = (torch.randn(SLOTS, parts * RANK, IN, generator=gen) * 0.1).to(DEVICE, dtype)
    b = (torch.randn(SLOTS, sum(PART_WIDTHS), RANK, generator=gen) * 0.1).to(DEVICE, dtype)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shrink_and_expand_match_the_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    a, b = weights(dtype, gen)
    slots = torch.tensor(TOKEN_SLOTS, dtype=torch.int32, device=DEVICE)
    x = torch.randn(len(TOKEN_SLOTS), IN + 8, generator=gen).to(DEVICE, dtype)[:, :IN]  # strided rows
    t = lora.lora_shrink(x, a, slots)
    t_ref = lora_shrink_ref(x, a, slots)
    assert t.dtype == torch.float32 and t.shape == (len(TOKEN_SLOTS), len(PART_WIDTHS) * RANK)
    torch.testing.assert_close(t, t_ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert not t[slots < 0].any()

    starts = [0, 40, 56]
    y = torch.randn(len(TOKEN_SLOTS), sum(PART_WIDTHS), generator=gen).to(DEVICE, dtype)
    before = y.clone()
    assert lora.lora_expand(t_ref, b, slots, y, starts) is y
    expected = lora_expand_ref(t_ref, b, slots, before.clone(), starts)
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    else:  # one rounding of (y + delta) either way; the fp32 dot products may differ in the last bits
        assert (y.float() - expected.float()).abs().max() <= 2**-6
    assert torch.equal(y[slots < 0], before[slots < 0])
    assert not torch.equal(y[slots >= 0], before[slots >= 0])


def test_the_reference_is_the_per_adapter_product():
    gen = torch.Generator().manual_seed(1)
    a, b = weights(torch.float32, gen)
    x = torch.randn(len(TOKEN_SLOTS), IN, generator=gen)
    slots = torch.tensor(TOKEN_SLOTS, dtype=torch.int32)
    a, b = a.cpu(), b.cpu()
    bounds = [0, 40, 56, 80]
    y = lora_expand_ref(lora_shrink_ref(x, a, slots), b, slots, torch.zeros(len(TOKEN_SLOTS), 80), bounds[:3])
    for row, slot in enumerate(TOKEN_SLOTS):
        for p, (start, end) in enumerate(zip(bounds, bounds[1:])):
            want = torch.zeros(end - start)
            if slot >= 0:
                want = x[row] @ a[slot, p * RANK : (p + 1) * RANK].t() @ b[slot, start:end].t()
            torch.testing.assert_close(y[row, start:end], want, rtol=1e-5, atol=1e-6)


def test_no_rows():
    a, b = weights(torch.float32, torch.Generator().manual_seed(2))
    slots = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    t = lora.lora_shrink(torch.zeros(0, IN, device=DEVICE), a, slots)
    assert t.shape == (0, 18)
    assert lora.lora_expand(t, b, slots, torch.zeros(0, 80, device=DEVICE), [0, 40, 56]).shape == (0, 80)


@needs_cuda
def test_cuda_graph_replays_with_new_slots():
    gen = torch.Generator().manual_seed(3)
    a, b = weights(torch.bfloat16, gen)
    x = torch.randn(len(TOKEN_SLOTS), IN, generator=gen).to(DEVICE, torch.bfloat16)
    slots = torch.tensor(TOKEN_SLOTS, dtype=torch.int32, device=DEVICE)
    y0 = torch.zeros(len(TOKEN_SLOTS), 80, dtype=torch.bfloat16, device=DEVICE)
    y = y0.clone()
    lora.lora_expand(lora.lora_shrink(x, a, slots), b, slots, y, [0, 40, 56])  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(y0)
        lora.lora_expand(lora.lora_shrink(x, a, slots), b, slots, y, [0, 40, 56])
    slots.copy_(torch.tensor([2, 2, -1, 1, 0, -1, 0, 1], dtype=torch.int32, device=DEVICE))
    graph.replay()
    expected = lora_expand_ref(lora_shrink_ref(x, a, slots), b, slots, y0.clone(), [0, 40, 56])
    assert (y.float() - expected.float()).abs().max() <= 2**-6
