"""The floor of a workload: the least time a GPU could take for it, from the bytes that must be read and
the FLOPs that must be done, at ceilings measured on the card in the same run (a bf16 GEMM and a device
copy). Every GPU benchmark reports its result as a fraction of this floor beside tok/s.

    prefill rows: every uncached prompt token through every layer; logits only for the last one
    decode rows:  output tokens 2 .. n of each request (the first comes from the prefill's last row)

    FLOPs = 2 x (layer weights x all rows + LM head x sampled rows) + attention (4 x heads x head_dim per
            (query, key) pair, causal)
    bytes = weights x steps (each step reads every weight once; decode steps >= rows / max_batch)
          + K/V read (each decode row reads its whole context; a prefill reads its own prompt's once)
          + K/V written (every new token's)

    floor_s       = max(FLOPs / matmul ceiling, bytes / memory ceiling), over the whole workload
    phase_floor_s = the same bound for prefill and for decode separately, summed: what an engine that does
                    not overlap a prefill's compute with a decode's memory traffic can reach

With LoRA adapters (``adapters`` distinct ones of ``adapter_params`` each, the requests spread evenly over
them): 2 x adapter_params more FLOPs a row; a decode step reads the A and B of every distinct adapter among
its rows (min(adapters, rows of the step)); the prefill reads each adapter a request uses at least once.

NOTE: the floor leaves out what is small at these shapes (norms, rotary, activations, sampling) and
everything an engine adds (kernel launches, host work). fraction = floor_s / measured seconds, so 1.0 is
the hardware's limit and 0.5 means twice as slow as it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, config: Mapping) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads", heads),
            vocab=config["vocab_size"],
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        )

    @property
    def layer_params(self) -> int:
        """Matmul weights of the decoder layers: q, k, v, o, gate, up, down."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.layers * self.hidden * (2 * q + 2 * kv + 3 * self.intermediate)

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    def kv_elements_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim

    def lora_params(self, rank: int) -> int:
        """One adapter on all seven projections of every layer: A [rank, in] and B [out, rank] each."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return self.layers * rank * ((q + h) + 2 * (kv + h) + (h + q) + 2 * (i + h) + (h + i))


@dataclass(frozen=True)
class Ceilings:
    """What the card did in this run: dense bf16 matmul FLOP/s and device-memory bytes/s (read + write)."""

    matmul_flops: float
    memory_bytes_per_s: float
    device: str = ""


@dataclass(frozen=True)
class Request:
    prompt_len: int
    output_len: int
    cached_len: int = 0  # prompt tokens found in the prefix cache: neither computed nor written


@dataclass(frozen=True)
class Floor:
    flops: float
    bytes: float
    prefill_flops: float
    prefill_bytes: float
    decode_flops: float
    decode_bytes: float
    output_tokens: int
    seconds: float
    phase_seconds: float

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    def fraction(self, measured_seconds: float) -> float:
        return self.seconds / measured_seconds

    def report(self, measured_seconds: float, ceilings: Ceilings) -> dict:
        """What a benchmark's JSON carries beside its tok/s."""
        return {
            "ceilings": asdict(ceilings),
            "floor_s": round(self.seconds, 3),
            "floor_output_tok_s": round(self.output_tok_s, 1),
            "fraction_of_floor": round(self.fraction(measured_seconds), 3),
            "phase_floor_s": round(self.phase_seconds, 3),
            "fraction_of_phase_floor": round(self.phase_seconds / measured_seconds, 3),
            "tflop": round(self.flops / 1e12, 1),
            "gb_moved": round(self.bytes / 1e9, 1),
        }


def workload_floor(
    shape: ModelShape,
    requests: Iterable[Request],
    ceilings: Ceilings,
    weight_bytes: float = 2.0,
    kv_bytes: float = 2.0,
    max_batch: int = 256,
    max_batched_tokens: int = 8192,
    adapters: int = 0,
    adapter_params: int = 0,
) -> Floor:
    """The floor of running ``requests`` with at most ``max_batch`` sequences and ``max_batched_tokens``
    prompt tokens per step (the engine's max_num_seqs and max_num_batched_tokens), over ``adapters``
    LoRA adapters of ``adapter_params`` each (``ModelShape.lora_params``) where given."""
    requests = list(requests)
    attn = 4 * shape.heads * shape.head_dim * shape.layers  # FLOPs per (query, key) pair over all layers
    kv_token = shape.kv_elements_per_token() * kv_bytes
    weights = (shape.layer_params + shape.lm_head_params) * weight_bytes

    prefill_rows = sum(r.prompt_len - r.cached_len for r in requests)
    # causal pairs of the computed rows: query i (0-based, after c cached) sees i + 1 keys
    prefill_pairs = sum(_triangle(r.prompt_len) - _triangle(r.cached_len) for r in requests)
    prefill_flops = 2 * (shape.layer_params * prefill_rows + shape.lm_head_params * len(requests))
    prefill_flops += attn * prefill_pairs
    prefill_steps = math.ceil(prefill_rows / max_batched_tokens) if prefill_rows else 0
    prefill_bytes = weights * prefill_steps + kv_token * (sum(r.prompt_len for r in requests) + prefill_rows)
    lora = adapter_params if adapters else 0
    prefill_flops += 2 * lora * prefill_rows
    prefill_bytes += weight_bytes * lora * min(adapters, len(requests))  # each used adapter, once

    decode_rows = sum(max(r.output_len - 1, 0) for r in requests)
    # decode row t (1-based) of a request attends to its prompt and t output tokens
    decode_pairs = sum((r.output_len - 1) * r.prompt_len + _triangle(r.output_len - 1) for r in requests)
    decode_flops = 2 * (shape.layer_params + shape.lm_head_params) * decode_rows + attn * decode_pairs
    longest = max((r.output_len - 1 for r in requests), default=0)
    decode_steps = max(math.ceil(decode_rows / max_batch), longest)
    decode_bytes = weights * decode_steps + kv_token * (decode_pairs + decode_rows)
    if decode_rows:
        decode_flops += 2 * lora * decode_rows
        per_step = min(adapters, math.ceil(decode_rows / decode_steps))  # distinct adapters a step
        decode_bytes += weight_bytes * lora * decode_steps * per_step

    def bound(flops: float, moved: float) -> float:
        return max(flops / ceilings.matmul_flops, moved / ceilings.memory_bytes_per_s)

    flops, moved = prefill_flops + decode_flops, prefill_bytes + decode_bytes
    return Floor(
        flops=flops,
        bytes=moved,
        prefill_flops=prefill_flops,
        prefill_bytes=prefill_bytes,
        decode_flops=decode_flops,
        decode_bytes=decode_bytes,
        output_tokens=sum(r.output_len for r in requests),
        seconds=bound(flops, moved),
        phase_seconds=bound(prefill_flops, prefill_bytes) + bound(decode_flops, decode_bytes),
    )


def kv_bytes_per_element(engine_args: Mapping) -> float:
    """1 for an fp8 KV cache, else 2 (bf16/fp16; the benchmarks' models are bf16)."""
    return 1.0 if engine_args.get("kv_cache_dtype") == "fp8" else 2.0


def engine_floor(
    shape: ModelShape,
    requests: Iterable[Request],
    ceilings: Ceilings,
    engine_args: Mapping,
    adapters: int = 0,
    lora_rank: int = 16,
) -> Floor:
    """``workload_floor`` under the batch limits and KV dtype of an engine's arguments, the requests spread
    over ``adapters`` LoRA adapters of ``lora_rank`` on every projection where given."""
    return workload_floor(
        shape,
        requests,
        ceilings,
        kv_bytes=kv_bytes_per_element(engine_args),
        max_batch=engine_args.get("max_num_seqs", 256),
        max_batched_tokens=engine_args.get("max_num_batched_tokens", 8192),
        adapters=adapters,
        adapter_params=shape.lora_params(lora_rank) if adapters else 0,
    )


def _triangle(n: int) -> int:
    return n * (n + 1) // 2


def measure_ceilings(device: str = "cuda", gemm_size: int = 8192, copy_bytes: int = 2 << 30) -> Ceilings:
    """The best of a few timed runs of an n x n x n bf16 matmul and of a device-to-device copy (bytes counted
    read + write). On a CPU (tests) pass small sizes: it measures the same way, in float32."""
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    matmul_s = _time_matmul(gemm_size, dtype, device)
    copy_s = _time_copy(copy_bytes, device)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return Ceilings(2 * gemm_size**3 / matmul_s, 2 * copy_bytes / copy_s, name)


def _time_matmul(n: int, dtype, device: str) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return _best_time(lambda: a @ b, device)


def _time_copy(num_bytes: int, device: str) -> float:
    import torch

    src = torch.empty(num_bytes // 2, device=device, dtype=torch.int16)
    dst = torch.empty_like(src)
    return _best_time(lambda: dst.copy_(src), device)


def _best_time(fn, device: str, repeats: int = 5, inner: int = 10) -> float:
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    fn()  # warm-up (cuBLAS heuristics, allocations)
    sync()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - started) / inner)
    return best
