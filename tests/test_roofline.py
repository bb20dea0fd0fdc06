"""The floor arithmetic of backend/benchmarks/roofline.py, pinned on a shape small enough to count by hand
and on the benchmark shapes (the figures docs/benchmarks.md and the README quote)."""

from __future__ import annotations

import math

import pytest

from pagetron.backend.benchmarks.gpu_workloads import SHAPES, workload_p, workload_t
from pagetron.backend.benchmarks.roofline import (
    Ceilings,
    ModelShape,
    Request,
    engine_floor,
    measure_ceilings,
    workload_floor,
)

# 1 layer, hidden 4, 2 heads of 2, 1 KV head, MLP 8, vocabulary 10
TINY = ModelShape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, vocab=10, head_dim=2)
H200 = Ceilings(matmul_flops=790e12, memory_bytes_per_s=4.3e12)


def test_a_request_counted_by_hand():
    # layer weights 4 x (2*4 + 2*2 + 3*8) = 144, LM head 40; 368 bytes of weights in bf16
    # K/V per token: 2 x 1 layer x 1 head x 2 dims x 2 bytes = 8 bytes; attention 16 FLOPs per pair
    # prefill of 3 tokens: 2 x (144 x 3 + 40 x 1) + 16 x 6 pairs = 1040 FLOPs;
    #   368 + 8 x (3 read + 3 written) = 416 bytes
    # decode of the 2nd output token: 2 x 184 + 16 x 4 pairs = 432 FLOPs; 368 + 8 x (4 + 1) = 408 bytes
    assert (TINY.layer_params, TINY.lm_head_params) == (144, 40)
    floor = workload_floor(TINY, [Request(3, 2)], Ceilings(matmul_flops=2.0, memory_bytes_per_s=1.0))
    assert (floor.prefill_flops, floor.prefill_bytes) == (1040, 416)
    assert (floor.decode_flops, floor.decode_bytes) == (432, 408)
    assert floor.seconds == max(1472 / 2, 824 / 1) == 824
    assert floor.phase_seconds == max(1040 / 2, 416) + max(432 / 2, 408) == 928
    assert floor.output_tokens == 2 and floor.output_tok_s == 2 / 824
    assert floor.fraction(1648) == 0.5


def test_lora_adapters_counted_by_hand():
    # one rank-1 adapter on every projection: 1 x ((4+4) + 2 (2+4) + (4+4) + 2 (8+4) + (4+8)) = 64 params,
    # 128 bytes; 2 x 64 more FLOPs a row; the prefill reads it once, each decode step once
    assert TINY.lora_params(1) == 64
    floor = workload_floor(TINY, [Request(3, 2)], H200, adapters=1, adapter_params=64)
    assert (floor.prefill_flops, floor.prefill_bytes) == (1040 + 2 * 64 * 3, 416 + 128)
    assert (floor.decode_flops, floor.decode_bytes) == (432 + 2 * 64, 408 + 128)
    # two requests over two adapters: a decode step of both rows reads both adapters; one row a step
    # (max_batch 1), one adapter a step
    two = [Request(3, 2)] * 2
    base = workload_floor(TINY, two, H200, max_batch=2).decode_bytes
    both = workload_floor(TINY, two, H200, max_batch=2, adapters=2, adapter_params=64)
    assert both.decode_bytes == base + 2 * 128
    one_a_step = workload_floor(TINY, two, H200, max_batch=1, adapters=2, adapter_params=64)
    assert one_a_step.decode_bytes == workload_floor(TINY, two, H200, max_batch=1).decode_bytes + 2 * 128


def test_decode_steps_are_bounded_by_the_batch_and_by_the_longest_request():
    one = [Request(3, 5)]
    assert workload_floor(TINY, one, H200).decode_bytes == 368 * 4 + 8 * (4 * 3 + 10 + 4)
    many = [Request(3, 5)] * 6  # 24 decode rows, 2 at a time: 12 steps of weights
    floor = workload_floor(TINY, many, H200, max_batch=2)
    assert floor.decode_bytes == 368 * 12 + 6 * 8 * (4 * 3 + 10 + 4)


def test_cached_prompt_tokens_are_neither_computed_nor_written():
    cold = workload_floor(TINY, [Request(8, 1)], H200)
    warm = workload_floor(TINY, [Request(8, 1, cached_len=4)], H200)
    # the 4 cached rows are not computed, nor their 1 + 2 + 3 + 4 causal pairs
    assert cold.prefill_flops - warm.prefill_flops == 2 * 144 * 4 + 16 * 10
    assert cold.prefill_bytes - warm.prefill_bytes == 8 * 4


def test_the_13b_shape_on_workload_t():
    shape = ModelShape.from_hf_config(SHAPES["llama2-13b"])
    requests = [Request(len(p), 256) for p in workload_t(32000)]
    bf16 = engine_floor(shape, requests, H200, {"max_num_seqs": 256})
    fp8 = engine_floor(shape, requests, H200, {"max_num_seqs": 256, "kv_cache_dtype": "fp8"})
    assert round(bf16.flops / 1e15, 2) == 10.98 and round(bf16.bytes / 1e12, 1) == 89.7
    assert round(fp8.bytes / 1e12, 1) == 51.9  # K/V halved, weights not
    assert round(bf16.output_tok_s) == 6281 and round(bf16.output_tokens / bf16.phase_seconds) == 4355
    assert round(fp8.output_tokens / fp8.phase_seconds) == 6140


@pytest.mark.parametrize("name, ms", [("llama2-13b", 6.10), ("llama3-8b", 3.51)])
def test_single_stream_decode_is_bound_by_reading_the_weights(name, ms):
    shape = ModelShape.from_hf_config(SHAPES[name])
    floor = workload_floor(shape, [Request(512, 256)], H200, max_batch=1)
    assert round(1e3 * floor.seconds / 256, 2) == ms
    weights_ms = 1e3 * (shape.layer_params + shape.lm_head_params) * 2 / H200.memory_bytes_per_s
    assert weights_ms < ms < 1.05 * weights_ms


def test_workload_p_with_the_system_prompt_cached_needs_less_prefill():
    shape = ModelShape.from_hf_config(SHAPES["llama3-8b"])
    prompts = workload_p(shape.vocab)
    on = workload_floor(shape, [Request(len(p), 256, 2048 if i else 0) for i, p in enumerate(prompts)], H200)
    off = workload_floor(shape, [Request(len(p), 256) for p in prompts], H200)
    assert on.decode_flops == off.decode_flops and on.prefill_flops < off.prefill_flops / 10


def test_ceilings_are_measured_not_assumed():
    measured = measure_ceilings("cpu", gemm_size=128, copy_bytes=1 << 20)
    assert measured.device == "cpu"
    assert math.isfinite(measured.matmul_flops) and measured.matmul_flops > 1e6
    assert math.isfinite(measured.memory_bytes_per_s) and measured.memory_bytes_per_s > 1e6


def test_the_report_carries_the_floor_beside_the_measurement():
    floor = workload_floor(TINY, [Request(3, 2)], Ceilings(2.0, 1.0, "test card"))
    report = floor.report(1648.0, Ceilings(2.0, 1.0, "test card"))
    assert report["fraction_of_floor"] == 0.5 and report["floor_s"] == 824
    assert report["ceilings"] == {"matmul_flops": 2.0, "memory_bytes_per_s": 1.0, "device": "test card"}
