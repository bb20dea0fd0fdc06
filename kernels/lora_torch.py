"""Batched LoRA for the CPU path: the rows of each adapter slot in a step are gathered into one padded
block, and every slot's block is multiplied at once (``torch.bmm``), so a layer costs a few host ops
however many adapters the step holds. The reference (``lora_ref``) loops over the slots, about eight ops
each a layer; with 32 adapters that loop was most of a CPU decode step.

    token_slots [ -1  0  2  0 -1  1  2  2 ]   (T = 8 rows)
    slots       [ 0  1  2 ]                   the step's slots, each a batch of the bmm
    rows        [[1 3 8] [5 8 8] [2 6 7]]     its rows, padded with T (a zero row appended to x and t)

Same products as the reference, in fp32, the result rounded once into ``y``; rows without an adapter
are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SlotBatches:
    """A step's rows by slot (``group_slots``); computed once a step, on the host."""

    slots: torch.Tensor  # [S'] the slots with rows, ascending
    rows: torch.Tensor  # [S', M] each slot's row indices, padded with T
    real: torch.Tensor  # [S', M] bool: not padding
    every_slot: bool  # slots == 0 .. S-1: the stacked weights are used as they are, not gathered


def group_slots(token_slots: torch.Tensor, num_slots: int) -> SlotBatches:
    num_rows = token_slots.shape[0]
    by_slot: dict[int, list[int]] = {}
    for row, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            by_slot.setdefault(slot, []).append(row)
    slots = sorted(by_slot)
    width = max((len(rows) for rows in by_slot.values()), default=0)
    rows = torch.full((len(slots), width), num_rows, dtype=torch.int64)
    for i, slot in enumerate(slots):
        rows[i, : len(by_slot[slot])] = torch.tensor(by_slot[slot])
    return SlotBatches(
        slots=torch.tensor(slots, dtype=torch.int64),
        rows=rows,
        real=rows < num_rows,
        every_slot=slots == list(range(num_slots)),
    )


def _padded(m: torch.Tensor) -> torch.Tensor:
    """``m`` in fp32 with a zero row appended (what the padding rows index)."""
    return torch.cat([m.float(), m.new_zeros(1, m.shape[1], dtype=torch.float32)])


def _weights(w: torch.Tensor, batches: SlotBatches) -> torch.Tensor:
    return (w if batches.every_slot else w[batches.slots]).float()


def lora_shrink_torch(
    x: torch.Tensor, a: torch.Tensor, batches: SlotBatches, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [T, K], a [S, P * R, K] -> fp32 [T, P * R] (zeros on rows without an adapter), written into
    ``out`` (zeroed) where given."""
    if out is None:
        out = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    if batches.slots.numel():
        t = torch.bmm(_padded(x)[batches.rows], _weights(a, batches).transpose(1, 2))  # [S', M, P R]
        out[batches.rows[batches.real]] = t[batches.real]
    return out


def lora_expand_torch(
    t: torch.Tensor,
    b: torch.Tensor,
    batches: SlotBatches,
    y: torch.Tensor,
    part_starts: list[int],
    accumulate: bool = True,
) -> torch.Tensor:
    """y [T, N] += per part p: t[:, p R : p R + R] @ b[slot, part p's columns]^T. In place; returns y.
    With ``accumulate`` False the product (rounded to y's dtype) is written over the rows with an adapter
    instead, as pagetron.kernels.lora's."""
    if not batches.slots.numel():
        return y
    rank, n = b.shape[2], y.shape[1]
    bounds = [*part_starts, n]
    ts, w = _padded(t)[batches.rows], _weights(b, batches)  # [S', M, P R], [S', N, R]
    delta = torch.cat(
        [
            torch.bmm(ts[:, :, p * rank : (p + 1) * rank], w[:, start:end].transpose(1, 2))
            for p, (start, end) in enumerate(zip(bounds, bounds[1:]))
        ],
        dim=2,
    )  # [S', M, N]
    rows = batches.rows[batches.real]
    if accumulate:
        y[rows] += delta[batches.real].to(y.dtype)
    else:
        y[rows] = delta[batches.real].to(y.dtype)
    return y
