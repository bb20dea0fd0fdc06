"""The kernels a model runs, chosen once when the model is built (layers never look one up per forward).

Two sets with one meaning: ``torch_ops()`` (the references in pagetron.kernels, the CPU path) and
``triton_ops()`` (the OpenAI-Triton kernels, CUDA, or the interpreter under ``TRITON_INTERPRET=1``;
imported only when asked for, so CPU runs never compile them). Attention entry points take the step's
AttentionMetadata so both sets share one signature; the references read host lists, the kernels device
tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pagetron.kernels import attention_ref, layers_ref

if TYPE_CHECKING:
    from pagetron.backend.model.layers.attention import AttentionMetadata

KERNEL_SETS = ("torch", "triton")

# (q, k_cache, v_cache, meta, softmax scale, k_scale, v_scale) -> attention output
AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "AttentionMetadata", float, float, float], torch.Tensor
]


@dataclass(frozen=True)
class KernelOps:
    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    # (x, residual, weight, eps, delta=None) -> (norm(residual + x'), residual + x'), x' = x plus a LoRA
    # delta not added yet (values, slots) on its rows whose slot is >= 0 (layers_ref.add_delta_ref)
    fused_add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # (positions, q, k, cos cache, sin cache) -> rotated (q, k)
    apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    # (gate_up, delta=None) -> silu(gate) * up, gate_up first taking the delta as above
    silu_and_mul: Callable[..., torch.Tensor]
    # (k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale); slots < 0 are skipped
    write_kv_cache: Callable[..., None]
    decode_attention: AttentionFn
    prefill_attention: AttentionFn


def _decode_ref(q, k_cache, v_cache, meta, scale, k_scale, v_scale):
    return attention_ref.paged_decode_attention_ref(
        q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip


def _prefill_ref(q, k_cache, v_cache, meta, scale, k_scale, v_scale):
    return attention_ref.paged_prefill_attention_ref(
        q, k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_start_loc,
        meta.prefill_seq_lens, scale, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip


def torch_ops() -> KernelOps:
    return KernelOps(
        name="torch",
        rms_norm=layers_ref.rms_norm_ref,
        fused_add_rms_norm=layers_ref.fused_add_rms_norm_ref,
        apply_rotary=layers_ref.apply_rotary_ref,
        silu_and_mul=layers_ref.silu_and_mul_ref,
        write_kv_cache=attention_ref.write_kv_cache_ref,
        decode_attention=_decode_ref,
        prefill_attention=_prefill_ref,
    )


def triton_ops() -> KernelOps:
    from pagetron.kernels.kv_cache_write import write_kv_cache
    from pagetron.kernels.paged_decode_attention import paged_decode_attention
    from pagetron.kernels.paged_prefill_attention import paged_prefill_attention
    from pagetron.kernels.rms_norm import fused_add_rms_norm, rms_norm
    from pagetron.kernels.rotary_embedding import apply_rotary
    from pagetron.kernels.silu_and_mul import silu_and_mul

    def decode(q, k_cache, v_cache, meta, scale, k_scale, v_scale):
        return paged_decode_attention(
            q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale,
            k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip

    def prefill(q, k_cache, v_cache, meta, scale, k_scale, v_scale):
        return paged_prefill_attention(
            q, k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_start_loc_t,
            meta.prefill_seq_lens_t, scale, meta.max_prefill_query_len, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip

    return KernelOps(
        name="triton",
        rms_norm=rms_norm,
        fused_add_rms_norm=fused_add_rms_norm,
        apply_rotary=apply_rotary,
        silu_and_mul=silu_and_mul,
        write_kv_cache=write_kv_cache,
        decode_attention=decode,
        prefill_attention=prefill,
    )


TORCH_OPS = torch_ops()


def kernel_ops(name: str) -> KernelOps:
    if name not in KERNEL_SETS:
        raise ValueError(f"kernel set must be one of {KERNEL_SETS}, got {name!r}")
    return TORCH_OPS if name == "torch" else triton_ops()
