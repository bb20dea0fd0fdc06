"""RMSNorm, computed in float32 like the reference implementations, optionally fused with the residual add.

Two backends with one meaning: "torch" (pagetron.kernels.layers_ref, the CPU path) and "triton"
(pagetron.kernels.rms_norm, CUDA only, imported lazily so CPU runs never compile it).
"""

from __future__ import annotations

import torch
from torch import nn

from pagetron.kernels.layers_ref import fused_add_rms_norm_ref, rms_norm_ref


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: str = "torch"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.backend = backend

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(residual + x), residual + x) as new tensors."""
        if self.backend == "triton":
            from pagetron.kernels.rms_norm import fused_add_rms_norm, rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return rms_norm_ref(x, self.weight, self.eps)
        return fused_add_rms_norm_ref(x, residual, self.weight, self.eps)
