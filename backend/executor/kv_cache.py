"""KV-cache sizing and allocation for one worker.

Layout: one tensor ``[2 (K, V), layers, blocks, block_size, kv_heads, head_dim]``; each attention layer
gets views of its K and V slices::

    kv_cache[0, layer] -> [num_blocks, block_size, kv_heads, head_dim]   (K)
    kv_cache[1, layer] -> same shape                                       (V)

Block ``b`` holds tokens ``b * block_size ... (b + 1) * block_size - 1`` of whichever sequence's block
table names it; a token's slot is ``block * block_size + offset``.
"""

from __future__ import annotations

import logging

import torch

from pagetron.backend.core.config import EngineConfig
from pagetron.backend.model.layers.attention import AttentionMetadata
from pagetron.backend.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    """Per rank: a tensor-parallel rank holds only its own KV heads."""
    attn = model.attention_layers()[0]
    elem = torch.empty(0, dtype=dtype).element_size()
    return 2 * len(model.attention_layers()) * block_size * attn.num_kv_heads * attn.head_dim * elem


def num_kv_blocks(
    config: EngineConfig,
    model: LlamaForCausalLM,
    max_model_len: int,
    kv_dtype: torch.dtype,
    device: torch.device,
) -> int:
    """``num_kv_blocks`` if given; on CUDA what ``gpu_memory_utilization`` leaves after the weights and a
    profiled forward pass; on CPU ``kv_cache_memory_gb``. Never more than max_num_seqs full sequences."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if device.type == "cuda":
        activations = profile_activation_bytes(config, model, max_model_len, device)
        free, total = torch.cuda.mem_get_info(device)
        budget = total * config.gpu_memory_utilization - (total - free) - activations
    else:
        budget = config.kv_cache_memory_gb * (1 << 30)
    num = int(budget // kv_bytes_per_block(model, config.block_size, kv_dtype))
    num = min(num, config.max_num_seqs * -(-max_model_len // config.block_size))
    if num < 1:
        raise ValueError("not enough memory for even one KV-cache block; raise kv_cache_memory_gb")
    return num


@torch.inference_mode()
def profile_activation_bytes(
    config: EngineConfig, model: LlamaForCausalLM, max_model_len: int, device: torch.device
) -> int:
    """Peak memory of a forward pass at max_num_batched_tokens plus the logits and sampler buffers of
    max_num_seqs rows, measured with attention skipped (the KV cache does not exist yet)."""
    n = config.max_num_batched_tokens
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    empty = torch.zeros(0, 0, dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(n, dtype=torch.int64, device=device),
        num_decode_tokens=0,
        decode_block_tables=empty,
        decode_context_lens=torch.zeros(0, dtype=torch.int32, device=device),
        prefill_block_tables=empty,
        prefill_query_start_loc=[0, n],
        prefill_seq_lens=[n],
        skip_attention=True,
    )
    ids = torch.zeros(n, dtype=torch.int64, device=device)
    positions = torch.arange(n, device=device) % max_model_len
    hidden = model(ids, positions, meta)
    rows = min(config.max_num_seqs, n)
    logits = model.compute_logits(hidden[:rows])  # None on tensor-parallel ranks other than 0
    # the sampler's worst case: a sorted copy, its indices and softmax of [rows, vocab] in fp32
    scratch = []
    if logits is not None:
        scratch = [torch.empty_like(logits) for _ in range(3)] + [torch.empty_like(logits, dtype=torch.int64)]
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del hidden, logits, scratch
    torch.cuda.empty_cache()
    return int(peak * 1.1)  # headroom for allocator fragmentation


def allocate_kv_cache(
    model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The cache tensor, bound to the model's attention layers."""
    attn = model.attention_layers()[0]
    shape = (2, len(model.attention_layers()), num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
    kv_cache = torch.zeros(shape, dtype=dtype, device=device)
    for i, attn in enumerate(model.attention_layers()):
        attn.k_cache, attn.v_cache = kv_cache[0, i], kv_cache[1, i]
    logger.info("KV cache: %d blocks of %d tokens", num_blocks, block_size)
    return kv_cache
