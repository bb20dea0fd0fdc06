"""Torch reference implementations of the fused elementwise layer kernels (RMSNorm, SiLU-and-mul, rotary).

They are the CPU path of the engine (the layers in pagetron.backend.model.layers call them) and define what
the OpenAI-Triton kernels in this package compute. Every rounding here is part of the contract: the HF
parity tests pin exact greedy tokens on this path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalised in fp32, cast to x's dtype, THEN multiplied by the weight
    (so a bf16 model rounds twice: after normalising and after the weight product), as HF Llama."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_delta_ref(x: torch.Tensor, delta: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """x [T, N] plus a LoRA product not added yet: delta = (values [T, N], slots [T]), added (rounded to
    x's dtype, as the LoRA expand adds in place) on the rows whose slot is >= 0; other rows' values are
    never read. x itself when delta is None."""
    if delta is None:
        return x
    values, slots = delta
    return torch.where((slots >= 0)[:, None], x + values, x)


def fused_add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    delta: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x): the residual stream's add (rounded to the dtype, as torch's
    add) and the next norm in one step, x first taking ``delta`` (add_delta_ref). Returns new tensors;
    the inputs are left as they are."""
    residual = residual + add_delta_ref(x, delta)
    return rms_norm_ref(residual, weight, eps), residual


def silu_and_mul_ref(
    gate_up: torch.Tensor, delta: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """[..., 2 * I] (gate first, then up, as the fused gate_up_proj) -> silu(gate) * up, [..., I]; a 2-D
    gate_up first takes ``delta`` (add_delta_ref)."""
    gate, up = add_delta_ref(gate_up, delta).chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary_ref(
    positions: torch.Tensor,  # [T] int
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos_cache: torch.Tensor,  # [max_position, D] fp32
    sin_cache: torch.Tensor,  # [max_position, D] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding. Returns new tensors (the Triton kernel rotates q and k in place).

    cos / sin are rounded to q's dtype first and each product and the sum are rounded to it (a bf16 model
    rounds four times), as HF's Llama does.
    """
    cos = cos_cache[positions].unsqueeze(1).to(q.dtype)
    sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
