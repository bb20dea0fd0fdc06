"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): the differences are config flags.

The residual stream is carried beside the hidden states, as in vLLM: each norm adds its input to the
residual first (fused_add_rms_norm), which is the same math and rounding as ``x = x + sublayer(norm(x))``.
Every layer runs the kernels of the KernelOps the model is built with (torch references or OpenAI-Triton
kernels, chosen once by the worker). With tensor parallelism each rank builds its shard (model/parallel.py):
QKV and gate_up split by output columns (heads), o_proj and down_proj by input rows (all-reduced), the
embedding and LM head by vocabulary range.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagetron.backend.model.kernel_ops import TORCH_OPS, KernelOps
from pagetron.backend.model.layers.attention import Attention, AttentionMetadata
from pagetron.backend.model.layers.norm import RMSNorm
from pagetron.backend.model.layers.rotary import RotaryEmbedding
from pagetron.backend.model.model_config import ModelConfig
from pagetron.backend.model.parallel import (
    SINGLE,
    ColumnParallelLinear,
    LoRADelta,
    ParallelLMHead,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    full,
    shape_of,
)


def kv_head_replicas(num_kv_heads: int, tp_size: int) -> int:
    """How many ranks hold each KV head: 1 when the heads split over the ranks, more when there are
    fewer KV heads than ranks (then every rank holds one)."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over {tp_size} ranks")
        return 1
    if tp_size % num_kv_heads:
        raise ValueError(f"{tp_size} ranks cannot share {num_kv_heads} KV heads evenly")
    return tp_size // num_kv_heads


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, max_position: int, ops: KernelOps = TORCH_OPS, tp: TensorParallel = SINGLE
    ):
        super().__init__()
        replicas = kv_head_replicas(cfg.num_kv_heads, tp.size)
        self.num_heads = tp.split(cfg.num_heads, "attention heads")
        self.num_kv_heads = cfg.num_kv_heads * replicas // tp.size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        q_full, kv_full = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size,
            [q_full, kv_full, kv_full],
            cfg.attention_bias,
            tp,
            cfg.head_dim,
            [1, replicas, replicas],
        )
        self.o_proj = RowParallelLinear(q_full, cfg.hidden_size, tp)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling, ops)
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, ops)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, LoRADelta | None]:
        """(o_proj's output, the LoRA delta it leaves to the next norm, or None)."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, meta)
        return self.o_proj.forward_deferred(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps = TORCH_OPS, tp: TensorParallel = SINGLE):
        super().__init__()
        self.intermediate_size = tp.split(cfg.intermediate_size, "intermediate_size")
        size = cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [size, size], False, tp)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, tp)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, LoRADelta | None]:
        """(down_proj's output, the LoRA delta it leaves to the next norm, or None)."""
        hidden = self.gate_up_proj.forward_silu_and_mul(x)
        if hidden is None:
            gate_up, delta = self.gate_up_proj.forward_deferred(x)
            hidden = self.ops.silu_and_mul(gate_up, delta=delta)
        return self.down_proj.forward_deferred(hidden)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, max_position: int, ops: KernelOps = TORCH_OPS, tp: TensorParallel = SINGLE
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = LlamaAttention(cfg, max_position, ops, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = LlamaMLP(cfg, ops, tp)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
        delta: LoRADelta | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, LoRADelta | None]:
        """(hidden, residual, delta) -> (this layer's MLP output, the residual stream before it, the MLP's
        LoRA delta or None); the stream after the layer is their sum, which the next norm computes. The
        first layer gets residual None; a delta is a LoRA product not added to hidden yet."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual, delta)
        hidden, delta = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual, delta)
        hidden, delta = self.mlp(hidden)
        return hidden, residual, delta


class LlamaModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, max_position: int, ops: KernelOps = TORCH_OPS, tp: TensorParallel = SINGLE
    ):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, max_position, ops, tp) for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden, residual, delta = self.embed_tokens(input_ids), None, None
        for layer in self.layers:
            hidden, residual, delta = layer(positions, hidden, residual, meta, delta)
        if residual is None:
            return self.norm(hidden)
        return self.norm(hidden, residual, delta)[0]


# The decoder layer's projections by their HF name: (our module under the layer, its part of a fused
# module). The checkpoint loader and LoRA (model/lora.py) both read this.
PROJECTIONS = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
# HF name fragment -> (our fused module, its part)
_PACKED = {name: (path.rpartition(".")[2], part) for name, (path, part) in PROJECTIONS.items()
           if path.endswith(("qkv_proj", "gate_up_proj"))}  # fmt: skip


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection's full, unsharded weight, by HF name."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # fmt: skip


_PARTS = {"qkv_proj": 3, "gate_up_proj": 2}


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, cfg: ModelConfig, max_position: int, ops: KernelOps = TORCH_OPS, tp: TensorParallel = SINGLE
    ):
        super().__init__()
        self.cfg, self.ops, self.tp = cfg, ops, tp
        self.model = LlamaModel(cfg, max_position, ops, tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[rows, vocab] fp32 logits on rank 0 (None on the other ranks)."""
        return self.lm_head.logits(hidden)

    def linear_layers(self) -> list[ColumnParallelLinear | RowParallelLinear]:
        return [m for m in self.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """HF-named tensors (or lazy safetensors slices) into our parameters, each rank reading its own
        shard; every parameter (every part of a fused one) must be written."""
        modules, params = dict(self.named_modules()), dict(self.named_parameters())
        written: set[tuple[str, int]] = set()
        for name, weight in weights:
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.cfg.tie_word_embeddings):
                continue
            if name.endswith(".input_scale"):  # an FP8 checkpoint's static activation scale: scaled per token
                continue
            target, part = name, 0
            for hf_part, (ours, index) in _PACKED.items():
                if f".{hf_part}." in name:
                    target, part = name.replace(f".{hf_part}.", f".{ours}."), index
                    break
            module_name, _, leaf = target.rpartition(".")
            if target not in params or module_name not in modules:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
            module = modules[module_name]
            try:
                if hasattr(module, "load"):
                    module.load(leaf, weight, part)
                elif shape_of(weight) != tuple(params[target].shape):
                    raise ValueError(f"has shape {shape_of(weight)}, expected {tuple(params[target].shape)}")
                else:
                    params[target].copy_(full(weight))
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {name!r} {e}") from None
            written.add((target, part))
        expected = {(n, p) for n in params for p in range(_PARTS.get(n.split(".")[-2], 1))}
        missing = sorted({n for n, _ in expected - written})
        if missing:
            raise ValueError(f"checkpoint is missing weights for: {', '.join(missing[:8])}")
