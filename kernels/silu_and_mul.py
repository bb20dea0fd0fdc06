"""OpenAI-Triton SiLU-and-mul: silu(gate) * up from the fused gate_up projection, in one pass.

The roundings are torch's for ``F.silu(gate) * up`` (pagetron.kernels.layers_ref.silu_and_mul_ref):
silu in fp32, rounded to the input dtype, then the product (exact in fp32 for bf16 / fp16 operands)
rounded once. Only the fp32 exp and division may differ from torch's by an ulp or two, which now and
then moves a bf16 rounding by one step. Sizes come from tensor shapes only (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, n_cols, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    row = x_ptr + token * stride_x
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + token * n_cols + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [..., 2 * I] (gate first, then up; rows may be strided, the last dim contiguous) ->
    silu(gate) * up as a new contiguous [..., I] tensor of the same dtype (or written into ``out``,
    which must be contiguous)."""
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
    block = min(1024, triton.next_power_of_2(size))
    grid = (x.shape[0], triton.cdiv(size, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), size, BLOCK=block, num_warps=4)
    return out
