"""RMSNorm, computed in float32 like the reference implementations, optionally fused with the residual add.

The kernels come from the KernelOps the layer is built with (pagetron.backend.model.kernel_ops).
"""

from __future__ import annotations

import torch
from torch import nn

from pagetron.backend.model.kernel_ops import TORCH_OPS, KernelOps


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, ops: KernelOps = TORCH_OPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.ops = ops

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        delta: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(residual + x), residual + x) as new tensors, x first taking
        the LoRA ``delta`` its layer left to this norm (model/lora.py), if any."""
        if residual is None:
            assert delta is None, "a LoRA delta is added with the residual"
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps, delta=delta)
