"""Tensor-parallel layers (Megatron-style), and the one place a rank's share of a weight is cut.

    column parallel:  Y = X [W_0 | W_1 | ...]   rank r holds the output columns W_r (QKV by heads, gate_up)
    row parallel:     Y = sum_r X_r W_r          rank r holds input rows W_r; the partial Ys are all-reduced
    vocab parallel:   embedding rows and LM-head columns split by vocabulary range (padded to a multiple of
                      the ranks); lookups outside a rank's range give zeros, summed by an all-reduce; logits
                      are gathered on rank 0, which alone samples

With one rank every layer is a plain nn.Linear / nn.Embedding and no collective runs. Weights arrive as
the checkpoint's full tensors, or as lazy safetensors slices, of which only this rank's part is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pagetron.backend.model.quantization import FP8, expand_scale, fp8_linear, quantize_rows


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place among the tensor-parallel ranks, and the group their collectives use."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed process group; None with one rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_on_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0 gets the ranks' ``x`` concatenated along the last dimension; the others get None."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x.contiguous(), parts, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def split(self, total: int, what: str) -> int:
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size {self.size}")
        return total // self.size


SINGLE = TensorParallel()


def narrow(weight: Any, dim: int, start: int, length: int) -> torch.Tensor:
    """``weight[..., start:start + length, ...]`` along ``dim``, reading only that part of a lazy slice."""
    if isinstance(weight, torch.Tensor):
        return weight.narrow(dim, start, length)
    index = tuple([slice(None)] * dim + [slice(start, start + length)])
    return weight[index]


def full(weight: Any) -> torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else weight[:]


def shape_of(weight: Any) -> tuple[int, ...]:
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else tuple(weight.get_shape())


class _Fp8Weights:
    """FP8 weights for a parallel linear layer (model/quantization.py): ``weight`` e4m3 and one fp32 scale
    per output row in ``weight_scale``, either quantized from the loaded weight or loaded as stored."""

    weight: nn.Parameter
    weight_scale: nn.Parameter | None  # registered as None by each layer: plain weights

    def expect_fp8_checkpoint(self) -> None:
        """Makes room for a checkpoint's FP8 weight and its scale (loaded next)."""
        rows, cols = self.weight.shape
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(rows, 1, dtype=torch.float32), requires_grad=False)

    def quantize_fp8(self) -> None:
        """Quantizes the loaded weight per output row (a no-op for weights loaded as FP8)."""
        if self.weight_scale is not None:
            return
        weight, scale = quantize_rows(self.weight.data)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.weight_scale is not None:
            return fp8_linear(x, self.weight, self.weight_scale, bias)
        return nn.functional.linear(x, self.weight, bias)


# a LoRA product its layer's consumer adds (values [T, N] in the output's dtype, token_slots [T] int32):
# rows whose slot is -1 have no adapter, and their values are never written (the kernels never read them)
LoRADelta = tuple[torch.Tensor, torch.Tensor]


class _LoRASlots:
    """Device slots of LoRA weights for a parallel linear layer, its logical parts (q, k, v or gate, up)
    fused as the base weight is, and the product each step's rows add (model/lora.py draws the layout)::

        lora_a [max_loras, parts * max_rank, in (this rank's)]   part p's A in rows p R .. p R + R
        lora_b [max_loras, out (this rank's), max_rank]          part p's B in its output columns
    """

    lora_context: Any = None  # LoRAContext shared by the model's layers; None: LoRA is off
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    lora_part_starts: list[int]  # first output column of each part in lora_b (and in the layer's output)

    def _lora_step(self) -> Any:
        """The LoRA context where this step has rows with an adapter slot, else None."""
        context = self.lora_context
        return context if context is not None and context.token_slots is not None else None

    def _lora_shrink(self, x: torch.Tensor) -> torch.Tensor | None:
        """Starts this layer's shrink (beside the base GEMM, where the context has a side stream); None:
        no row uses an adapter."""
        context = self._lora_step()
        return None if context is None else context.start_shrink(x, self.lora_a, self.lora_offset)

    def _lora_expand(self, t: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        if t is None:
            return y
        return self.lora_context.expand_into(t, self.lora_b, y, self.lora_part_starts)

    def forward_deferred(self, x: torch.Tensor) -> tuple[torch.Tensor, LoRADelta | None]:
        """(the base output, the LoRA delta its consumer adds: a fused norm or silu_and_mul), where the
        context computes deltas beside the base GEMM (model/lora.py); else (forward(x), None)."""
        context = self._lora_step()
        if context is None or not context.defers() or not self._may_defer():
            return self(x), None
        delta = context.start_delta(x, self.lora_a, self.lora_b, self.lora_offset, self.lora_part_starts)
        y = self._base(x)
        context.join(y)
        return y, delta

    def _may_defer(self) -> bool:
        return True

    def _lora_buffers(
        self, context: Any, slots: int, rank: int, in_features: int, outs: list[int], device, dtype
    ):
        self.lora_context, self.lora_rank = context, rank
        self.lora_offset = context.register(len(outs) * rank)  # its columns of the shrink's workspace
        self.lora_a = torch.zeros(slots, len(outs) * rank, in_features, device=device, dtype=dtype)
        self.lora_b = torch.zeros(slots, sum(outs), rank, device=device, dtype=dtype)
        self.lora_part_starts = [sum(outs[:p]) for p in range(len(outs))]

    def _load_part(self, slot: int, part: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """A [r, in (this rank's)] and B [out of the part (this rank's), r] into slot ``slot``; None: 0."""
        rank, bounds = self.lora_rank, [*self.lora_part_starts, self.lora_b.shape[1]]
        start, end = bounds[part], bounds[part + 1]
        slot_a = self.lora_a[slot, part * rank : (part + 1) * rank]
        slot_b = self.lora_b[slot, start:end]
        slot_a.zero_()
        slot_b.zero_()
        if a is not None:
            slot_a[: a.shape[0]].copy_(a)
            slot_b[:, : b.shape[1]].copy_(b)


class ColumnParallelLinear(_LoRASlots, _Fp8Weights, nn.Module):
    """Output features split over the ranks; ``parts`` are the logical outputs fused into one matrix (q, k,
    v or gate, up), each split on its own and stored rank-locally back to back::

        full:    [ q (Hq*D) | k (Hkv*D) | v (Hkv*D) ]
        rank r:  [ q_r      | k_r       | v_r       ]     q_r = heads r*Hq/N ..., k_r likewise

    ``replicas[i]`` > 1 means part i has fewer units than ranks: each unit (a KV head) is held by that many
    consecutive ranks.
    """

    def __init__(
        self,
        in_features: int,
        parts: list[int],
        bias: bool,
        tp: TensorParallel = SINGLE,
        unit: int = 1,
        replicas: list[int] | None = None,
    ):
        super().__init__()
        self.tp, self.unit = tp, unit
        self.parts = parts
        self.replicas = replicas or [1] * len(parts)
        self.local_parts = [
            (size // unit) * r // tp.size * unit if r > 1 else tp.split(size // unit, "units") * unit
            for size, r in zip(parts, self.replicas)
        ]
        local = sum(self.local_parts)
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.empty(local)) if bias else None
        self.register_parameter("weight_scale", None)

    def _local_range(self, part: int) -> tuple[int, int]:
        """(start, length) of this rank's rows of logical part ``part`` in the full tensor's part."""
        length, replicas = self.local_parts[part], self.replicas[part]
        return (self.tp.rank // replicas) * length, length

    def load(self, name: str, weight: Any, part: int = 0) -> None:
        if name == "weight_scale" and self.weight_scale is not None:
            start, length = self._local_range(part)
            offset = sum(self.local_parts[:part])
            scale = expand_scale(weight, self.parts[part])
            self.weight_scale.data[offset : offset + length].copy_(scale[start : start + length])
            return
        for param, is_bias in ((self.weight, False), (self.bias, True)):
            if param is None or name != ("bias" if is_bias else "weight"):
                continue
            start, length = self._local_range(part)
            expected = (self.parts[part],) if is_bias else (self.parts[part], param.shape[1])
            if shape_of(weight) != expected:
                raise ValueError(f"has shape {shape_of(weight)}, expected {expected}")
            offset = sum(self.local_parts[:part])
            param.data[offset : offset + length].copy_(narrow(weight, 0, start, length))
            return
        raise ValueError(f"no parameter {name!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._lora_shrink(x)
        return self._lora_expand(t, self._base(x))

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this gate|up layer's output, its LoRA expand fused into that kernel, where
        the context fuses it (model/lora.py); None: the caller runs forward_deferred and silu_and_mul."""
        context = self._lora_step()
        if context is None or not context.fuses_silu():
            return None
        t = context.start_shrink(x, self.lora_a, self.lora_offset)
        return context.expand_silu_and_mul(self._base(x), t, self.lora_b)

    def enable_lora(self, context: Any, slots: int, rank: int, device, dtype) -> None:
        self._lora_buffers(context, slots, rank, self.weight.shape[1], self.local_parts, device, dtype)

    def load_lora(self, slot: int, part: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Part ``part`` of slot ``slot``: A [r, in] and this rank's rows of B [out, r]; None: zeros."""
        start, length = self._local_range(part)
        self._load_part(slot, part, a, None if b is None else b[start : start + length])


class RowParallelLinear(_LoRASlots, _Fp8Weights, nn.Module):
    """Input features split over the ranks; each computes a partial product, all-reduced."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(out_features, tp.split(in_features, "input features")))
        self.register_parameter("weight_scale", None)

    def load(self, name: str, weight: Any, part: int = 0) -> None:
        if name == "weight_scale" and self.weight_scale is not None:
            self.weight_scale.data.copy_(expand_scale(weight, self.weight.shape[0]))
            return
        if name != "weight":
            raise ValueError(f"no parameter {name!r}")
        expected = (self.weight.shape[0], self.in_features)
        if shape_of(weight) != expected:
            raise ValueError(f"has shape {shape_of(weight)}, expected {expected}")
        length = self.weight.shape[1]
        self.weight.data.copy_(narrow(weight, 1, self.tp.rank * length, length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._lora_shrink(x)
        return self.tp.all_reduce(self._lora_expand(t, self._base(x)))

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, None)

    def _may_defer(self) -> bool:
        return self.tp.size == 1  # else each rank's delta must join the all-reduce

    def enable_lora(self, context: Any, slots: int, rank: int, device, dtype) -> None:
        self._lora_buffers(context, slots, rank, self.weight.shape[1], [self.weight.shape[0]], device, dtype)

    def load_lora(self, slot: int, part: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Slot ``slot``: this rank's input columns of A [r, in] and B [out, r]; None: zeros."""
        length = self.weight.shape[1]
        columns = None if a is None else a[:, self.tp.rank * length : (self.tp.rank + 1) * length]
        self._load_part(slot, 0, columns, b)


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * V', (rank + 1) * V') of the vocabulary (V' = V padded up to the ranks, divided)."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden))

    def load(self, name: str, weight: Any, part: int = 0) -> None:
        if name != "weight":
            raise ValueError(f"no parameter {name!r}")
        expected = (self.vocab_size, self.weight.shape[1])
        if shape_of(weight) != expected:
            raise ValueError(f"has shape {shape_of(weight)}, expected {expected}")
        length = max(0, min(self.per_rank, self.vocab_size - self.start))
        self.weight.data.zero_()  # the padding rows past the vocabulary
        if length:
            self.weight.data[:length].copy_(narrow(weight, 0, self.start, length))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside[:, None], 0))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, split like the embedding (it may share its weight); rank 0 gets the full
    [T, V] logits in fp32, the other ranks None."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        local = nn.functional.linear(hidden, self.weight).float()
        logits = self.tp.gather_on_first(local)
        return None if logits is None else logits[:, : self.vocab_size]
