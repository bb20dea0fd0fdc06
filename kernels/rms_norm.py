"""OpenAI-Triton RMSNorm, alone or fused with the residual add before it (as vLLM's fused_add_rms_norm).

One program per row (token, or token and head for Qwen3's q/k norms), the whole row in one masked
power-of-two block, fp32 math. The roundings are those of pagetron.kernels.layers_ref: the residual sum
is rounded to the input dtype (torch's add, bit for bit), the normalised row is rounded to the input
dtype and THEN multiplied by the weight, the product rounded once to the output dtype (exact as torch's:
a product of two bf16 / fp16 values is exact in fp32). Only the fp32 sum of squares (its order) and
rsqrt may differ from torch: about one fp32 ulp of the scale, which rarely moves a bf16 rounding.

The fused form may also take ``delta``, a LoRA product its input x has not had added yet (its rows
whose slot is -1 unwritten): x + delta is rounded to x's dtype first, as the LoRA expand rounds it when it
adds in place, so the result is the same bits as expanding into x before the norm (model/lora.py draws
why a layer leaves it to the norm).

Sizes come from tensor shapes only and nothing syncs the host, so the kernels can be captured in a
CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    res_out_ptr,
    w_ptr,
    out_ptr,
    delta_ptr,
    delta_slots_ptr,
    stride_d,
    inner,  # rows per outer index: heads for a [T, H, N] input, else 1
    stride_xo,
    stride_xi,
    stride_ro,
    stride_ri,
    stride_so,
    stride_si,
    stride_oo,
    stride_oi,  # (outer, inner) strides of x, residual, residual_out, out; the last dim is contiguous
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // inner
    inner_idx = row % inner
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + outer * stride_xo + inner_idx * stride_xi + offs, mask=mask, other=0.0)
    if HAS_DELTA:  # 2-D x only (inner == 1)
        has = tl.load(delta_slots_ptr + outer + offs * 0) >= 0  # this row's slot, as a vector
        d = tl.load(delta_ptr + outer * stride_d + offs, mask=mask & has, other=0.0)
        x = tl.where(has, (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype), x)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + outer * stride_ro + inner_idx * stride_ri + offs, mask=mask, other=0.0)
        x = (res.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + outer * stride_so + inner_idx * stride_si + offs, x, mask=mask)
    xf = x.to(tl.float32)
    mean_square = tl.sum(xf * xf, axis=0) / n_cols
    normed = (xf * tl.math.rsqrt(mean_square + eps)).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (normed * w).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + outer * stride_oo + inner_idx * stride_oi + offs, y, mask=mask)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """[N] / [T, N] / [T, H, N] (any row and head strides) as [T, H, N] with a contiguous last dim."""
    if t.dim() == 1:
        t = t[None]
    if t.dim() > 3:
        t = t.reshape(-1, t.shape[-1])
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t[:, None] if t.dim() == 2 else t


def _checked_out(out: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    assert out.shape == like.shape and out.dtype == dtype, f"{name} must be {tuple(like.shape)} {dtype}"
    assert out.stride(-1) == 1 and out.dim() <= 3, f"{name} needs a contiguous last dim and at most 3 dims"
    return out


def _launch(x, residual, weight, eps, out, residual_out, delta=None):
    n_cols = x.shape[-1]
    assert weight.shape == (n_cols,) and weight.is_contiguous(), "weight must be [hidden] and contiguous"
    out = _checked_out(out, x, torch.promote_types(x.dtype, weight.dtype), "out")
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x"
        residual_out = _checked_out(residual_out, x, x.dtype, "residual_out")
    if x.numel() == 0:
        return out, residual_out
    x3, o3 = _as_3d(x), _as_3d(out)
    r3 = _as_3d(residual) if residual is not None else x3
    s3 = _as_3d(residual_out) if residual is not None else x3
    values, slots = delta if delta is not None else (x3, x3)
    if delta is not None:
        assert x.dim() == 2 and values.shape == x.shape and values.dtype == x.dtype, "delta must match x"
        assert values.stride(-1) == 1 and slots.shape == (x.shape[0],), "delta: contiguous rows, a slot each"
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(x3.shape[0] * x3.shape[1],)](
        x3,
        r3,
        s3,
        weight,
        o3,
        values,
        slots,
        values.stride(0),
        x3.shape[1],
        x3.stride(0),
        x3.stride(1),
        r3.stride(0),
        r3.stride(1),
        s3.stride(0),
        s3.stride(1),
        o3.stride(0),
        o3.stride(1),
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        HAS_DELTA=delta is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 512)),
    )
    return out, residual_out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim of x ([N], [T, N] or [T, H, N]; any row / head strides, a contiguous last
    dim), as rms_norm_ref. Returns a new contiguous tensor of promote_types(x.dtype, weight.dtype), or
    writes ``out`` (same shape and dtype, contiguous last dim)."""
    return _launch(x, None, weight, eps, out, None)[0]


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    delta: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x), as fused_add_rms_norm_ref: one read of each input row.
    ``delta`` (values [T, N] in x's dtype, slots [T] int32) is added to x's rows whose slot is >= 0 first
    (x 2-D).

    Both results are new tensors unless ``out`` / ``residual_out`` are given; ``residual_out`` may be
    ``residual`` itself (vLLM's in-place update: every program reads its row before writing it) or x.
    """
    return _launch(x, residual, weight, eps, out, residual_out, delta)
