"""The CPU path's batched LoRA (kernels/lora_torch.py: a step's rows by slot, one bmm for all slots)
equals the reference that loops over the slots, and its grouping pins exact rows."""

import pytest
import torch

from pagetron.kernels.layers_ref import add_delta_ref
from pagetron.kernels.lora_ref import lora_expand_ref, lora_shrink_ref
from pagetron.kernels.lora_torch import group_slots, lora_expand_torch, lora_shrink_torch

PART_WIDTHS = [40, 16, 24]


def test_rows_are_batched_by_slot_with_padding():
    batches = group_slots(torch.tensor([-1, 0, 2, 0, -1, 1, 2, 2]), 3)
    assert batches.slots.tolist() == [0, 1, 2] and batches.every_slot
    assert batches.rows.tolist() == [[1, 3, 8], [5, 8, 8], [2, 6, 7]]
    assert batches.real.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    some = group_slots(torch.tensor([3, -1, 1, 3]), 4)
    assert some.slots.tolist() == [1, 3] and not some.every_slot and some.rows.tolist() == [[2, 4], [0, 3]]
    none = group_slots(torch.tensor([-1, -1]), 2)
    assert none.slots.numel() == 0 and none.rows.shape == (0, 0)


@pytest.mark.parametrize(
    "token_slots",
    [
        [-1, 0, 2, 0, -1, 1, 2, 2],  # every slot, padding in two of them
        [3, 3, -1, 1] * 5,  # some slots: their weights gathered
        [-1, -1, -1],  # no adapter: nothing changes
        [2] * 40,  # one slot, many rows (a prefill chunk)
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_batched_products_equal_the_reference(token_slots, dtype):
    gen = torch.Generator().manual_seed(len(token_slots))
    slots, rank, k = 4, 6, 50
    a = (torch.randn(slots, len(PART_WIDTHS) * rank, k, generator=gen) * 0.1).to(dtype)
    b = (torch.randn(slots, sum(PART_WIDTHS), rank, generator=gen) * 0.1).to(dtype)
    x = torch.randn(len(token_slots), k, generator=gen).to(dtype)
    ids = torch.tensor(token_slots)
    batches = group_slots(ids, slots)
    t = lora_shrink_torch(x, a, batches)
    t_ref = lora_shrink_ref(x, a, ids)
    torch.testing.assert_close(t, t_ref, rtol=1e-5, atol=1e-6)
    y = torch.randn(len(token_slots), sum(PART_WIDTHS), generator=gen).to(dtype)
    starts = [0, 40, 56]
    got = lora_expand_torch(t_ref, b, batches, y.clone(), starts)
    want = lora_expand_ref(t_ref, b, ids, y.clone(), starts)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:  # one rounding of (y + delta) each; the fp32 sums may differ in their last bit
        assert (got.float() - want.float()).abs().max() <= 2**-6
    assert torch.equal(got[ids < 0], y[ids < 0])
    # as a delta for the next kernel to add: written on the rows with an adapter only, the same bits
    delta = torch.full_like(y, float("nan"))
    lora_expand_torch(t_ref, b, batches, delta, starts, accumulate=False)
    assert delta[ids < 0].isnan().all() and not delta[ids >= 0].isnan().any()
    assert torch.equal(add_delta_ref(y, (delta, ids)), got)
