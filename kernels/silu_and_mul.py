"""OpenAI-Triton SiLU-and-mul: silu(gate) * up from the fused gate_up projection, in one pass.

The roundings are torch's for ``F.silu(gate) * up`` (pagetron.kernels.layers_ref.silu_and_mul_ref):
silu in fp32, rounded to the input dtype, then the product (exact in fp32 for bf16 / fp16 operands)
rounded once. Only the fp32 exp and division may differ from torch's by an ulp or two, which now and
then moves a bf16 rounding by one step. Sizes come from tensor shapes only (CUDA-graph safe).

``delta`` is a LoRA product of the gate_up projection not added yet (as in rms_norm.py): gate + delta and
up + delta are each rounded to the dtype first, the bits of expanding into gate_up before this kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, delta_ptr, delta_slots_ptr, stride_x, stride_d, n_cols,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    row = x_ptr + token * stride_x
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if HAS_DELTA:
        has = tl.load(delta_slots_ptr + token + cols * 0) >= 0  # this row's slot, as a vector
        d_row = delta_ptr + token * stride_d
        d_gate = tl.load(d_row + cols, mask=mask & has, other=0.0).to(tl.float32)
        d_up = tl.load(d_row + n_cols + cols, mask=mask & has, other=0.0).to(tl.float32)
        gate = tl.where(has, (gate + d_gate).to(dtype).to(tl.float32), gate)
        up = tl.where(has, (up + d_up).to(dtype).to(tl.float32), up)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + token * n_cols + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(
    gate_up: torch.Tensor,
    out: torch.Tensor | None = None,
    delta: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """gate_up [..., 2 * I] (gate first, then up; rows may be strided, the last dim contiguous) ->
    silu(gate) * up as a new contiguous [..., I] tensor of the same dtype (or written into ``out``,
    which must be contiguous). ``delta`` (values [T, 2 I] in gate_up's dtype, slots [T] int32) is added to
    the rows of a 2-D gate_up whose slot is >= 0 first."""
    assert gate_up.shape[-1] % 2 == 0, "the last dim holds gate and up: it must be even"
    size = gate_up.shape[-1] // 2
    shape = (*gate_up.shape[:-1], size)
    if out is None:
        out = torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    assert out.shape == shape and out.dtype == gate_up.dtype and out.is_contiguous(), "bad out tensor"
    x = gate_up if gate_up.dim() == 2 else gate_up.reshape(-1, 2 * size)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out.numel() == 0:
        return out
    values, slots = delta if delta is not None else (x, x)
    if delta is not None:
        assert gate_up.dim() == 2 and values.shape == gate_up.shape and values.dtype == gate_up.dtype, (
            "delta must match gate_up"
        )
        assert values.stride(-1) == 1 and slots.shape == (x.shape[0],), "delta: contiguous rows, a slot each"
    block = min(1024, triton.next_power_of_2(size))
    grid = (x.shape[0], triton.cdiv(size, block))
    _silu_and_mul_kernel[grid](
        x, out, values, slots, x.stride(0), values.stride(0), size,
        HAS_DELTA=delta is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out
