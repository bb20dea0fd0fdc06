"""What decode CUDA graphs do on the host: which batch sizes are captured, how a step is padded into the
static buffers a replay reads, and the LoRA path a capture's eager pass takes (the capture itself needs a
GPU: tests/kernels and the GPU benchmarks)."""

import torch

from pagetron.backend.executor.cuda_graphs import DecodeGraphs, graph_batch_sizes
from pagetron.backend.model.layers.attention import AttentionMetadata
from pagetron.backend.model.lora import LoRAContext
from pagetron.kernels.lora_torch import group_slots, lora_expand_torch, lora_shrink_torch


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(24) == [1, 2, 4, 8, 16, 24]


def decode_step(n: int, max_blocks: int = 3) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    ids = torch.arange(100, 100 + n)
    tables = torch.arange(n * 2, dtype=torch.int32).reshape(n, 2)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(40, 40 + n),
        num_decode_tokens=n,
        decode_block_tables=tables,
        decode_context_lens=torch.arange(5, 5 + n, dtype=torch.int32),
        prefill_block_tables=torch.zeros(0, 0, dtype=torch.int32),
        prefill_query_start_loc=[0],
        prefill_seq_lens=[],
    )
    return ids, torch.arange(7, 7 + n), meta


def test_a_step_is_padded_into_the_smallest_captured_batch_that_holds_it():
    context = LoRAContext(lora_shrink_torch, lora_expand_torch, group_slots, num_slots=2)
    graphs = DecodeGraphs(None, max_batch=20, max_blocks=3, device=torch.device("cpu"), lora_context=context)
    graphs.slot_mapping.fill_(99)  # what an earlier, larger step left
    graphs.context_lens.fill_(99)
    graphs.lora_slots.fill_(1)
    context.token_slots = torch.tensor([1, -1, 0, 1, 0], dtype=torch.int32)
    ids, positions, meta = decode_step(5)
    assert graphs.fill(ids, positions, meta) == 8
    assert graphs.input_ids[:5].tolist() == list(range(100, 105))
    assert graphs.positions[:5].tolist() == list(range(7, 12))
    # the padding rows write no KV (slot -1), attend to one token and use no adapter
    assert graphs.slot_mapping[:9].tolist() == [40, 41, 42, 43, 44, -1, -1, -1, 99]
    assert graphs.context_lens[:9].tolist() == [5, 6, 7, 8, 9, 1, 1, 1, 99]
    assert graphs.lora_slots[:9].tolist() == [1, -1, 0, 1, 0, -1, -1, -1, 1]
    assert graphs.block_tables[:5, :2].tolist() == meta.decode_block_tables.tolist()
    context.token_slots = None  # a step without adapters: every row's slot is -1
    assert graphs.fill(*decode_step(16)) == 16
    assert graphs.lora_slots[:16].tolist() == [-1] * 16


def test_the_eager_pass_before_a_capture_takes_the_captured_lora_path():
    context = LoRAContext(lora_shrink_torch, lora_expand_torch, group_slots, num_slots=2)
    seen = []

    def model(ids, positions, meta):
        seen.append((ids.shape[0], context.as_captured, context.token_slots.data_ptr()))
        return ids

    graphs = DecodeGraphs(model, max_batch=8, max_blocks=3, device=torch.device("cpu"), lora_context=context)
    out = graphs.run_eagerly(4, graphs._meta(4))
    assert out.shape[0] == 4
    assert seen == [(4, True, graphs.lora_slots.data_ptr())]  # the static slots, as a replay reads them
    assert not context.as_captured
