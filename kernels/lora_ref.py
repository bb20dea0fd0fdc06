"""Torch reference of the batched LoRA kernels (pagetron.kernels.lora and the CPU path's lora_torch): the
rows of each adapter slot are gathered and multiplied together, slot after slot, in fp32, and the product
rounded once into ``y``. Where those take the rows grouped, the reference takes the slot of each row."""

from __future__ import annotations

import torch


def lora_shrink_ref(
    x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [T, K], a [S, P * R, K], token_slots [T] (-1: no adapter) -> fp32 [T, P * R], written into
    ``out`` (zeroed) where given."""
    if out is None:
        out = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    for slot in token_slots.unique().tolist():
        if slot >= 0:
            rows = (token_slots == slot).nonzero().squeeze(1)
            out[rows] = x[rows].float() @ a[slot].float().t()
    return out


def lora_expand_ref(
    t: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, y: torch.Tensor, part_starts: list[int]
) -> torch.Tensor:
    """y [T, N] += per part p: t[:, p R : p R + R] @ b[slot, part p's columns]^T. In place; returns y."""
    rank, n = b.shape[2], y.shape[1]
    bounds = [*part_starts, n]
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        delta = torch.cat(
            [
                t[rows, p * rank : (p + 1) * rank] @ b[slot, start:end].float().t()
                for p, (start, end) in enumerate(zip(bounds, bounds[1:]))
            ],
            dim=1,
        )
        y[rows] += delta.to(y.dtype)
    return y
