"""The batched LoRA kernels (shrink and expand over rows grouped by adapter slot) equal their torch
reference, and the grouping puts each slot's rows in exact blocks.

Without CUDA they run in the Triton interpreter on small shapes: rows of three adapters and of none
(slot -1) mixed in one call, three fused parts (q | k | v) of uneven widths that do not align with the
column blocks, a rank below the block width and an input width that is not a multiple of the K block; a
slot with more rows than one block holds; a wide input that the shrink splits over K. The shrink
accumulates in fp32 as the reference does (fp32: to 1e-5 relative; bf16: to the reference's fp32 sums
within 1e-2); the expand's add into ``y`` rounds once, as the reference's; rows without an adapter are
left bit-identical; an expand that writes its product as a delta for the next kernel gives the same bits
once added; the gate|up expand fused into the SiLU-and-mul gives the bits of the expand then that kernel;
and a model gives the same output whether its layers expand in place, leave deltas to the kernels after
them or fuse gate|up's expand. With CUDA the kernels also run inside a captured graph whose slot buffer
changes between replays (the grouping is captured too).
"""

import pytest
import torch

from kernel_testing import DEVICE, for_device, needs_cuda
from pagetron.kernels import lora as kernel_module
from pagetron.kernels.layers_ref import add_delta_ref
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


def test_rows_are_grouped_into_blocks_of_one_slot():
    rows = lora.group_rows(torch.tensor(TOKEN_SLOTS, dtype=torch.int32, device=DEVICE), SLOTS)
    # at most ceil(8 / 16) + min(3, 8) = 4 blocks: slot 0 from order[2], slot 1 from [4], slot 2 from [5]
    assert rows.block_slot.tolist() == [0, 1, 2, -1]
    pad = [-1] * 13
    assert rows.block_rows.tolist() == [[1, 3, -1, *pad], [5, -1, -1, *pad], [2, 6, 7, *pad], [-1] * 16]
    # 40 rows of slot 1 and 3 of slot 0: slot 1 takes three blocks (16, 16, 8 rows)
    many = torch.tensor([1] * 20 + [0, 0, 0] + [1] * 20 + [-1], dtype=torch.int32, device=DEVICE)
    rows = lora.group_rows(many, 2)
    assert rows.block_slot.tolist() == [0, 1, 1, 1, -1]
    assert rows.block_rows.tolist() == [
        [20, 21, 22, *[-1] * 13],  # slot 0
        list(range(16)),  # slot 1, in row order (stable), three blocks
        [16, 17, 18, 19, *range(23, 35)],
        [*range(35, 43), *[-1] * 8],
        [-1] * 16,
    ]
    # in blocks of 32 rows: slot 1 takes two (32, 8)
    rows = lora.group_rows(many, 2, block_m=32)
    assert rows.block_slot.tolist() == [0, 1, 1, -1]
    assert rows.block_rows[1].tolist() == [*range(20), *range(23, 35)]
    assert rows.block_m == 32 and rows.block_rows.shape == (4, 32)
    assert rows.block_rows[2].tolist() == [*range(35, 43), *[-1] * 24]  # slot 1's last 8 rows


def test_the_shrink_tiles_fit_shared_memory():
    assert kernel_module._shrink_block_k(16, 64, 2) == 64  # rank 16 q|k|v, decode
    assert kernel_module._shrink_block_k(64, 512, 2) == 32  # rank 128 q|k|v, 64-row blocks
    assert kernel_module._shrink_block_k(16, 512, 4) == 16  # the same in fp32
    assert kernel_module._shrink_block_k(64, 2048, 4) == 16  # never below tl.dot's smallest K


def test_long_steps_take_larger_blocks():
    for num_rows, block_m in [(kernel_module.LARGE_STEP_ROWS, 16), (kernel_module.LARGE_STEP_ROWS + 1, 64)]:
        slots = torch.full((num_rows,), -1, dtype=torch.int32, device=DEVICE)
        assert lora.group_rows(slots, SLOTS).block_m == block_m


def check_against_reference(dtype, token_slots, in_features, seed, block_m=None):
    gen = torch.Generator().manual_seed(seed)
    parts = len(PART_WIDTHS)
    a = (torch.randn(SLOTS, parts * RANK, in_features, generator=gen) * 0.1).to(DEVICE, dtype)
    b = (torch.randn(SLOTS, sum(PART_WIDTHS), RANK, generator=gen) * 0.1).to(DEVICE, dtype)
    slots = torch.tensor(token_slots, dtype=torch.int32, device=DEVICE)
    rows = lora.group_rows(slots, SLOTS, block_m)
    x = torch.randn(len(token_slots), in_features + 8, generator=gen).to(DEVICE, dtype)[:, :in_features]
    t = lora.lora_shrink(x, a, rows)  # strided rows above
    t_ref = lora_shrink_ref(x, a, slots)
    assert t.dtype == torch.float32 and t.shape == (len(token_slots), parts * RANK)
    torch.testing.assert_close(t, t_ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert not t[slots < 0].any()
    # into a layer's columns of a zeroed workspace (rows strided past them): the same sums
    workspace = torch.zeros(len(token_slots), parts * RANK + 10, device=DEVICE)
    columns = workspace[:, 4 : 4 + parts * RANK]
    assert lora.lora_shrink(x, a, rows, columns) is columns
    torch.testing.assert_close(columns, t, rtol=1e-6, atol=1e-6)
    assert not workspace[:, :4].any() and not workspace[:, 4 + parts * RANK :].any()

    starts = [0, 40, 56]
    y = torch.randn(len(token_slots), sum(PART_WIDTHS), generator=gen).to(DEVICE, dtype)
    before = y.clone()
    assert lora.lora_expand(t_ref, b, rows, y, starts) is y
    expected = lora_expand_ref(t_ref, b, slots, before.clone(), starts)
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    else:  # t is rounded to bf16 before its product, then one rounding of (y + delta)
        assert (y.float() - expected.float()).abs().max() <= 2**-6
    assert torch.equal(y[slots < 0], before[slots < 0])
    assert not torch.equal(y[slots >= 0], before[slots >= 0])
    # a delta for the next kernel to add: written on the rows with an adapter only, and adding it rounds
    # as the expand's add in place
    delta = torch.full_like(y, float("nan"))
    assert lora.lora_expand(t_ref, b, rows, delta, starts, accumulate=False) is delta
    assert delta[slots < 0].isnan().all() and not delta[slots >= 0].isnan().any()
    assert torch.equal(add_delta_ref(before, (delta, slots)), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shrink_and_expand_match_the_reference(dtype):
    check_against_reference(dtype, TOKEN_SLOTS, IN, seed=0)


def test_many_rows_per_slot_and_a_wide_input_split_over_k():
    # slot 2 spans three blocks; 1,100 input features split in three K ranges (added atomically)
    check_against_reference(torch.float32, [2] * 35 + [0, -1, 1] * 3, 1100, seed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_blocks_of_long_steps(dtype):
    # 64-row blocks and 128-column expand tiles: slot 2 spans two blocks, slot 0 fills one partly
    check_against_reference(dtype, [2] * 70 + [0, -1, 1] * 5, IN, seed=5, block_m=kernel_module.LARGE_BLOCK_M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_m", [None, kernel_module.LARGE_BLOCK_M], ids=["decode", "long"])
def test_the_expand_fused_into_silu_and_mul(dtype, block_m):
    """The gate|up expand inside the SiLU-and-mul that follows it: the bits of expanding in place and then
    silu_and_mul (exp aside, as that kernel), on rows of three slots and of none, over a width that is not
    a multiple of the column tile."""
    from pagetron.kernels import silu_and_mul as silu_module

    gen = torch.Generator().manual_seed(6)
    size, token_slots = 100, TOKEN_SLOTS if block_m is None else [2] * 70 + [0, -1, 1] * 5
    num_rows = len(token_slots)
    slots = torch.tensor(token_slots, dtype=torch.int32, device=DEVICE)
    b = (torch.randn(SLOTS, 2 * size, RANK, generator=gen) * 0.3).to(DEVICE, dtype)
    t = torch.randn(num_rows, 2 * RANK, generator=gen).to(DEVICE)
    gate_up = (torch.randn(num_rows, 2 * size + 6, generator=gen) * 2).to(DEVICE, dtype)[:, 3 : 3 + 2 * size]
    all_rows = lora.group_rows(slots + 1, SLOTS + 1, block_m)
    got = lora.lora_expand_silu_and_mul(gate_up, t, b, all_rows)
    expanded = lora.lora_expand(t, b, lora.group_rows(slots, SLOTS, block_m), gate_up.clone(), [0, size])
    want = for_device(silu_module).silu_and_mul(expanded)
    assert got.shape == (num_rows, size) and not got.isnan().any()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, want)
    plain = for_device(silu_module).silu_and_mul(gate_up)
    assert torch.equal(got[slots < 0], plain[slots < 0])
    assert not torch.equal(got[slots >= 0], plain[slots >= 0])


def test_the_fused_expand_sums_high_ranks_in_chunks():
    """Rank 80 (two 64-wide chunks of a 128-wide rank block): the expand in place then silu_and_mul, to
    fp32 rounding."""
    from pagetron.kernels import silu_and_mul as silu_module

    gen = torch.Generator().manual_seed(12)
    size, rank = 40, 80
    slots = torch.tensor(TOKEN_SLOTS, dtype=torch.int32, device=DEVICE)
    b = (torch.randn(SLOTS, 2 * size, rank, generator=gen) * 0.1).to(DEVICE)
    t = torch.randn(len(TOKEN_SLOTS), 2 * rank, generator=gen).to(DEVICE)
    gate_up = torch.randn(len(TOKEN_SLOTS), 2 * size, generator=gen).to(DEVICE)
    got = lora.lora_expand_silu_and_mul(gate_up, t, b, lora.group_rows(slots + 1, SLOTS + 1))
    expanded = lora.lora_expand(t, b, lora.group_rows(slots, SLOTS), gate_up.clone(), [0, size])
    torch.testing.assert_close(got, for_device(silu_module).silu_and_mul(expanded), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_a_gate_up_layer_fuses_its_expand_into_silu_and_mul():
    """The layer's fused path (no side stream: eager steps) gives silu_and_mul of its plain forward."""
    from pagetron.backend.model.lora import LoRAContext
    from pagetron.backend.model.parallel import ColumnParallelLinear
    from pagetron.kernels import silu_and_mul as silu_module

    gen = torch.Generator().manual_seed(7)
    context = LoRAContext(
        lora.lora_shrink, lora.lora_expand, lora.group_rows, SLOTS, None, lora.lora_expand_silu_and_mul
    )
    layer = ColumnParallelLinear(IN, [50, 50], False)
    layer.weight.data = (torch.randn(100, IN, generator=gen) * 0.1).to(DEVICE)
    layer.enable_lora(context, SLOTS, RANK, DEVICE, torch.float32)
    for slot in range(SLOTS):
        for part in range(2):
            a, b = torch.randn(RANK, IN, generator=gen), torch.randn(50, RANK, generator=gen)
            layer.load_lora(slot, part, a.to(DEVICE) * 0.1, b.to(DEVICE) * 0.1)
    x = torch.randn(len(TOKEN_SLOTS), IN, generator=gen).to(DEVICE)
    for token_slots in (TOKEN_SLOTS, [2, -1, 0, 0, 1, -1, -1, 2]):  # new slots: grouped again
        context.token_slots = torch.tensor(token_slots, dtype=torch.int32, device=DEVICE)
        assert context.fuses_silu()
        fused = layer.forward_silu_and_mul(x)
        context.token_slots = context.token_slots.clone()
        want = for_device(silu_module).silu_and_mul(layer(x))
        torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-6)
    context.token_slots = None
    assert layer.forward_silu_and_mul(x) is None  # no adapter rows: the plain path


def test_only_one_rank_defers_a_row_parallel_layers_delta():
    """A row-parallel layer's delta must join its all-reduce, so only a single rank leaves it to the next
    kernel; a column-parallel layer's output is the rank's own."""
    from pagetron.backend.model.parallel import ColumnParallelLinear, RowParallelLinear, TensorParallel

    two = TensorParallel(rank=0, size=2)
    assert RowParallelLinear(8, 8)._may_defer() and not RowParallelLinear(8, 8, two)._may_defer()
    assert ColumnParallelLinear(8, [8], False, two)._may_defer()


def lora_model(dtype):
    """The 3-layer test model (test_kernel_rms_norm) with the Triton kernels and LoRA on every projection:
    random weights in three slots."""
    from test_kernel_rms_norm import tiny_model

    from kernel_testing import triton_ops_for_device
    from pagetron.backend.model.lora import LoRAManager

    model = tiny_model(False, dtype, ops=triton_ops_for_device())
    manager = LoRAManager(model, 3, 8, 3, torch.device(DEVICE), dtype, kernels="triton")
    gen = torch.Generator().manual_seed(11)
    for layer in model.model.layers:
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            module = layer.get_submodule(name)
            module.lora_a.copy_(torch.randn(module.lora_a.shape, generator=gen) * 0.3)
            module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=gen) * 0.3)
    return model, manager.context


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@torch.inference_mode()
def test_a_model_adds_the_same_lora_bits_in_line_deferred_or_fused(dtype, monkeypatch):
    """The three ways a step adds LoRA: each expand in place; o, gate_up and down left as deltas to the
    fused kernels after them (decode graphs with a side stream); gate_up's expand fused into the
    SiLU-and-mul (steps without one). The same output bits (the fused kernel's fp32 sums aside)."""
    from test_kernel_rms_norm import prefill_batch

    model, context = lora_model(dtype)
    ids, positions, meta = prefill_batch([5, 9, 3])
    slots = torch.tensor([0] * 5 + [-1] * 9 + [2] * 3, dtype=torch.int32, device=DEVICE)
    outs = {}
    for mode in ("in line", "deferred", "fused"):
        monkeypatch.setattr(context, "fuses_silu", lambda mode=mode: mode == "fused")
        monkeypatch.setattr(context, "defers", lambda mode=mode: mode == "deferred")
        context.token_slots = slots.clone()
        outs[mode] = model(ids, positions, meta).clone()
    context.token_slots = None
    assert not torch.equal(outs["in line"], model(ids, positions, meta))  # the adapters change it
    assert torch.equal(outs["deferred"], outs["in line"])
    if dtype == torch.float32:
        torch.testing.assert_close(outs["fused"], outs["in line"], rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(outs["fused"], outs["in line"])


@torch.inference_mode()
def test_a_deferred_layers_shrink_output_lives_until_the_join(monkeypatch):
    """Without the shared workspace (a step too large for it) a deferred layer's shrink writes a buffer of
    its own on the side stream: it must outlive the side stream's work, i.e. stay referenced until the
    main stream joins."""
    import gc
    import weakref

    from test_kernel_rms_norm import prefill_batch

    from pagetron.backend.model import lora as lora_module

    model, context = lora_model(torch.float32)
    monkeypatch.setattr(lora_module, "WORKSPACE_MAX_BYTES", 0)
    written, freed_at_join = [], []
    shrink, join = context.shrink, context.join

    def spy_shrink(x, a, rows, out):
        written.append(weakref.ref(out))
        return shrink(x, a, rows, out)

    def spy_join(y):
        gc.collect()
        freed_at_join.append(written[-1]() is None)
        return join(y)

    monkeypatch.setattr(context, "shrink", spy_shrink)
    monkeypatch.setattr(context, "join", spy_join)
    monkeypatch.setattr(context, "defers", lambda: True)
    monkeypatch.setattr(context, "fuses_silu", lambda: False)
    ids, positions, meta = prefill_batch([5, 9, 3])
    context.token_slots = torch.tensor([0] * 5 + [-1] * 9 + [2] * 3, dtype=torch.int32, device=DEVICE)
    model(ids, positions, meta)
    assert len(freed_at_join) == 3 * len(model.model.layers) and not any(freed_at_join)


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
    rows = lora.group_rows(torch.zeros(0, dtype=torch.int32, device=DEVICE), SLOTS)
    t = lora.lora_shrink(torch.zeros(0, IN, device=DEVICE), a, rows)
    assert t.shape == (0, 18)
    assert lora.lora_expand(t, b, rows, torch.zeros(0, 80, device=DEVICE), [0, 40, 56]).shape == (0, 80)


@needs_cuda
def test_cuda_graph_replays_with_new_slots():
    gen = torch.Generator().manual_seed(3)
    a, b = weights(torch.bfloat16, gen)
    x = torch.randn(len(TOKEN_SLOTS), IN, generator=gen).to(DEVICE, torch.bfloat16)
    slots = torch.tensor(TOKEN_SLOTS, dtype=torch.int32, device=DEVICE)
    y0 = torch.zeros(len(TOKEN_SLOTS), 80, dtype=torch.bfloat16, device=DEVICE)
    y = y0.clone()

    def step() -> None:
        rows = lora.group_rows(slots, SLOTS)
        lora.lora_expand(lora.lora_shrink(x, a, rows), b, rows, y, [0, 40, 56])

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(y0)
        step()
    slots.copy_(torch.tensor([2, 2, -1, 1, 0, -1, 0, 1], dtype=torch.int32, device=DEVICE))
    graph.replay()
    expected = lora_expand_ref(lora_shrink_ref(x, a, slots), b, slots, y0.clone(), [0, 40, 56])
    assert (y.float() - expected.float()).abs().max() <= 2**-6
