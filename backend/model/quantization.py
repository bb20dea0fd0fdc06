"""FP8 (e4m3) linear layers: weights with one scale per output channel, activations quantized per token
at run time (dynamic), as vLLM's "fp8" quantization does.

    W [out, in] -> Wq = round_e4m3(W / sw),  sw[o] = max|W[o, :]| / 448   (at load, or from the checkpoint)
    x [T, in]   -> xq = round_e4m3(x / sx),  sx[t] = max|x[t, :]| / 448   (every forward)
    y [T, out]  =  (xq @ Wq^T) * sx * sw^T

On CUDA the product is one ``torch._scaled_mm`` with row-wise scales (fp32 accumulation, bf16 out); on the
CPU it is emulated: the same e4m3 values, dequantized to fp32 and multiplied. The weights of a checkpoint
already in FP8 (an HF ``quantization_config`` with ``quant_method: "fp8"``, or compressed-tensors with 8-bit
float weights) load as stored, with their per-tensor or per-channel scales; their static input scales are
not used (activations are always scaled per token). Embeddings and the LM head stay in the model dtype.
"""

from __future__ import annotations

from typing import Any

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` [rows, cols] scaled so its largest magnitude becomes 448, rounded to e4m3:
    (values [rows, cols] e4m3, scales [rows, 1] fp32)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_MIN_SCALE) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with ``weight`` [out, in] e4m3 and ``weight_scale`` [out, 1] fp32."""
    rows = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_rows(rows)
    if x.is_cuda:
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(), out_dtype=x.dtype)
    else:
        y = ((xq.float() * x_scale) @ (weight.float() * weight_scale).t()).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def checkpoint_fp8_scheme(quantization_config: dict[str, Any] | None) -> str | None:
    """ "fp8" if an HF ``quantization_config`` describes FP8 weights Pagetron loads as stored, None if there
    is none; ValueError naming what is not supported."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method == "fp8":
        if quantization_config.get("weight_block_size"):
            raise ValueError("block-wise FP8 checkpoints (weight_block_size) are not supported yet")
        return "fp8"
    if method == "compressed-tensors":
        for group in (quantization_config.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            fp8 = weights.get("num_bits") == 8 and weights.get("type") == "float"
            if not fp8 or weights.get("strategy") not in ("tensor", "channel"):
                raise ValueError(f"compressed-tensors weights {weights} are not supported (only 8-bit float, "
                                 "per tensor or per channel)")  # fmt: skip
        return "fp8"
    raise ValueError(f"quant_method {method!r} is not supported (fp8 and compressed-tensors FP8 are)")


def expand_scale(scale: Any, rows: int) -> torch.Tensor:
    """A checkpoint's weight scale (one per tensor, or one per output row) as [rows, 1] fp32."""
    tensor = (scale if isinstance(scale, torch.Tensor) else scale[:]).float().reshape(-1)
    if tensor.numel() == 1:
        return tensor.expand(rows).reshape(rows, 1).clone()
    if tensor.numel() != rows:
        raise ValueError(f"weight_scale has {tensor.numel()} values for {rows} rows")
    return tensor.reshape(rows, 1)
