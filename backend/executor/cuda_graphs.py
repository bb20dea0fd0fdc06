"""CUDA graphs of the decode-only forward pass, one per batch size, replayed over static input buffers.

A decode step launches hundreds of small kernels; replaying a captured graph removes their launch cost.
A batch of n decodes runs in the smallest captured size >= n; the padding rows write nowhere (slot -1)
and attend to one cached token, and their outputs are dropped. With LoRA the graphs include the batched
LoRA kernels, reading each row's adapter slot from a static buffer (-1: the base model, and padding).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pagetron.backend.model.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4) if s <= max_batch] + list(range(8, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        max_batch: int,
        max_blocks: int,
        device: torch.device,
        lora_context: Any = None,
    ):
        self.model, self.lora_context = model, lora_context
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.input_ids = torch.zeros(self.max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(self.max_batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((self.max_batch,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(self.max_batch, max_blocks, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(self.max_batch, dtype=torch.int32, device=device)
        self.empty = torch.zeros(0, 0, dtype=torch.int32, device=device)
        self.lora_slots = torch.full((self.max_batch,), -1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            num_decode_tokens=batch,
            decode_block_tables=self.block_tables[:batch],
            decode_context_lens=self.context_lens[:batch],
            prefill_block_tables=self.empty,
            prefill_query_start_loc=[0],
            prefill_seq_lens=[],
        )

    @torch.inference_mode()
    def capture(self) -> None:
        started = time.perf_counter()
        pool = None
        # the warm-up passes run eagerly on these buffers: rows that write nowhere, whatever ran before
        self.slot_mapping.fill_(-1)
        self.context_lens.fill_(1)
        self.lora_slots.fill_(-1)
        for batch in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            pool = self._capture_one(batch, self._meta(batch), pool)
        if self.lora_context is not None:
            self.lora_context.token_slots = None
        logger.info(
            "captured %d decode CUDA graphs in %.1f s", len(self.graphs), time.perf_counter() - started
        )

    def _capture_one(self, batch: int, meta: AttentionMetadata, pool: Any) -> Any:
        """Warms up and captures the graph of ``batch`` rows in ``pool``; returns the pool."""
        self.run_eagerly(batch, meta)  # compile and warm up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.model(self.input_ids[:batch], self.positions[:batch], meta)
        torch.cuda.synchronize()
        self.graphs[batch] = (graph, out)
        return graph.pool()

    def run_eagerly(self, batch: int, meta: AttentionMetadata) -> torch.Tensor:
        """The first ``batch`` rows of the buffers through the path a capture takes, without capturing."""
        if self.lora_context is not None:
            self.lora_context.token_slots = self.lora_slots[:batch]
            self.lora_context.as_captured = True  # the captured LoRA path, compiled here
        out = self.model(self.input_ids[:batch], self.positions[:batch], meta)
        if self.lora_context is not None:  # group the rows inside the capture, not reuse this pass's
            self.lora_context.as_captured = False
            self.lora_context.regroup()
        return out

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decode-only step of ``meta`` replayed in the smallest captured batch that holds it."""
        n, batch = input_ids.shape[0], self.fill(input_ids, positions, meta)
        graph, out = self.graphs[batch]
        graph.replay()
        return out[:n]

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> int:
        """Copies a step into the static buffers, padding it to the smallest captured batch; returns that."""
        slot_mapping, block_tables = meta.slot_mapping, meta.decode_block_tables
        context_lens = meta.decode_context_lens
        n = input_ids.shape[0]
        batch = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.slot_mapping[n:batch].fill_(-1)
        self.context_lens[:n].copy_(context_lens)
        self.context_lens[n:batch].fill_(1)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables)
        if self.lora_context is not None:
            token_slots = self.lora_context.token_slots
            if token_slots is None:
                self.lora_slots[:n].fill_(-1)
            else:
                self.lora_slots[:n].copy_(token_slots)
            self.lora_slots[n:batch].fill_(-1)
        return batch
