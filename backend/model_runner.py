"""Owns the weights and the KV cache; turns a scheduled batch into flattened model inputs and samples."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from pagetron.backend.config import EngineConfig
from pagetron.backend.cuda_graphs import DecodeGraphs
from pagetron.backend.layers.attention import AttentionMetadata
from pagetron.backend.loader import ModelFiles
from pagetron.backend.models.llama import LlamaForCausalLM
from pagetron.backend.models.model_config import ModelConfig
from pagetron.backend.sampler import Sampler, SamplerOutput
from pagetron.backend.sequence import Sequence
from pagetron.kernels.attention_ref import FP8_DTYPE

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine argument 'device': 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda":
        raise ValueError("engine argument 'attention_backend': the Triton kernels need a CUDA device")
    return name


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        files: ModelFiles,
        model_config: ModelConfig,
        max_model_len: int,
        eos_token_ids: set[int],
    ):
        self.config = config
        self.model_config = model_config
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_cache_dtype = FP8_DTYPE if config.kv_cache_dtype.startswith("fp8") else self.dtype
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = LlamaForCausalLM(model_config, max_position=max_model_len)
        finally:
            torch.set_default_dtype(default_dtype)
        if config.load_format == "dummy":
            _init_dummy_weights(model, config.seed)
        else:
            model.load_weights(files.weights())
        self.model = model.eval()
        self.attention_backend = resolve_attention_backend(config.attention_backend, self.device)
        for attn in self.model.attention_layers():
            attn.backend = self.attention_backend
        self.model.set_kernel_backend(self.attention_backend)  # fused norm/rotary/activation kernels
        self.num_kv_blocks = self._num_kv_blocks()
        self._allocate_kv_cache()
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and self.attention_backend == "triton" and not config.enforce_eager:
            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, min(config.max_num_seqs, 512), max_blocks, self.device)
            self.graphs.capture()
        self.sampler = Sampler(eos_token_ids, seed=config.seed)
        self._long_staging = HostStaging(np.int64, self.device)
        self._int_staging = HostStaging(np.int32, self.device)

    def _kv_bytes_per_block(self) -> int:
        c = self.model_config
        elem = torch.empty(0, dtype=self.kv_cache_dtype).element_size()
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * elem

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            activations = self._profile_activation_bytes()
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * self.config.gpu_memory_utilization - (total - free) - activations
        else:
            budget = self.config.kv_cache_memory_gb * (1 << 30)
        num = int(budget // self._kv_bytes_per_block())
        # more than max_num_seqs full-length sequences can never be resident at once
        num = min(num, self.config.max_num_seqs * -(-self.max_model_len // self.block_size))
        if num < 1:
            raise ValueError("not enough memory for even one KV-cache block; raise kv_cache_memory_gb")
        return num

    @torch.inference_mode()
    def _profile_activation_bytes(self) -> int:
        """Peak memory of a forward pass at max_num_batched_tokens plus the logits and sampler buffers of
        max_num_seqs rows, measured with attention skipped (the KV cache does not exist yet)."""
        c, dev = self.config, self.device
        n = c.max_num_batched_tokens
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        empty = torch.zeros(0, 0, dtype=torch.int32, device=dev)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(n, dtype=torch.int64, device=dev),
            num_decode_tokens=0,
            decode_block_tables=empty,
            decode_context_lens=torch.zeros(0, dtype=torch.int32, device=dev),
            prefill_block_tables=empty,
            prefill_query_start_loc=[0, n],
            prefill_seq_lens=[n],
            skip_attention=True,
        )
        ids = torch.zeros(n, dtype=torch.int64, device=dev)
        positions = torch.arange(n, device=dev) % self.max_model_len
        hidden = self.model(ids, positions, meta)
        rows = min(c.max_num_seqs, n)
        logits = self.model.compute_logits(hidden[:rows])
        # the sampler's worst case: a sorted copy, its indices and softmax of [rows, vocab] in fp32
        scratch = [torch.empty_like(logits) for _ in range(3)] + [torch.empty_like(logits, dtype=torch.int64)]
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        del hidden, logits, scratch
        torch.cuda.empty_cache()
        return int(peak * 1.1)  # headroom for allocator fragmentation

    def _allocate_kv_cache(self) -> None:
        c = self.model_config
        shape = (2, c.num_layers, self.num_kv_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        logger.info("KV cache: %d blocks of %d tokens", self.num_kv_blocks, self.block_size)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], SamplerOutput]:
        """Runs one forward over ``(sequence, number of new tokens)`` pairs and samples for every sequence
        whose chunk reaches its last known token. Returns those sequences and their samples, in order."""
        batch = self._prepare(scheduled)
        meta = batch.meta
        if (
            self.graphs is not None
            and batch.num_prefills == 0
            and meta.num_decode_tokens <= self.graphs.max_batch
        ):
            hidden = self.graphs.run(
                batch.input_ids, batch.positions, meta.slot_mapping, meta.decode_block_tables,
                meta.decode_context_lens,
            )  # fmt: skip
        else:
            hidden = self.model(batch.input_ids, batch.positions, meta)
        if not batch.sample_seqs:
            return [], SamplerOutput([], [], [])
        logits = self.model.compute_logits(hidden[batch.sample_rows])
        return batch.sample_seqs, self.sampler(logits, batch.sample_seqs)

    def _prepare(self, scheduled: list[tuple[Sequence, int]]) -> PreparedBatch:
        """Flattens a step into device tensors: decode tokens first, then the prefill chunks in order.

        Built in numpy and sent in two host-to-device copies (one int64, one int32 buffer): per-tensor
        copies of Python lists cost milliseconds at a few hundred sequences. Every part is a 16-byte
        aligned view of its buffer.
        """
        decodes = [s for s, n in scheduled if n == 1]
        prefills = [(s, n) for s, n in scheduled if n != 1]
        bs = self.block_size
        num_decode = len(decodes)
        num_tokens = num_decode + sum(n for _, n in prefills)
        # int64 buffer: [input ids | positions | slots | rows to sample]
        long_offsets = _aligned_offsets([num_tokens] * 3 + [len(scheduled)], itemsize=8)
        longs = self._long_staging.zeros(long_offsets[-1])
        ids, positions, slots, sample_rows = (
            longs[long_offsets[i] : long_offsets[i] + n]
            for i, n in enumerate([num_tokens] * 3 + [len(scheduled)])
        )
        sample_seqs: list[Sequence] = []
        num_sampled = 0
        for i, seq in enumerate(decodes):
            pos = seq.num_computed_tokens
            ids[i] = seq.token_ids[pos]
            positions[i] = pos
            slots[i] = seq.block_table[pos // bs] * bs + pos % bs
            if pos + 1 == seq.num_tokens:  # else a one-token chunk in the middle of a chunked prefill
                sample_rows[num_sampled] = i
                num_sampled += 1
                sample_seqs.append(seq)
        offset = num_decode
        for seq, n in prefills:
            start = seq.num_computed_tokens
            ids[offset : offset + n] = seq.token_ids[start : start + n]
            pos = np.arange(start, start + n, dtype=np.int64)
            positions[offset : offset + n] = pos
            slots[offset : offset + n] = (
                np.asarray(seq.block_table, dtype=np.int64)[pos // bs] * bs + pos % bs
            )
            offset += n
            if start + n == seq.num_tokens:
                sample_rows[num_sampled] = offset - 1
                num_sampled += 1
                sample_seqs.append(seq)
        # int32 buffer: [decode context lens | decode block tables | query starts | seq lens | prefill tables]
        decode_width = max((len(s.block_table) for s in decodes), default=0)
        prefill_width = max((len(s.block_table) for s, _ in prefills), default=0)
        num_prefills = len(prefills)
        sizes = [
            num_decode,
            num_decode * decode_width,
            num_prefills + 1,
            num_prefills,
            num_prefills * prefill_width,
        ]
        int_offsets = _aligned_offsets(sizes, itemsize=4)
        ints = self._int_staging.zeros(int_offsets[-1])
        parts = [ints[off : off + n] for off, n in zip(int_offsets, sizes)]
        context_lens, decode_tables, query_start, seq_lens, prefill_tables = parts
        decode_tables = decode_tables.reshape(num_decode, decode_width)
        prefill_tables = prefill_tables.reshape(num_prefills, prefill_width)
        for i, seq in enumerate(decodes):
            context_lens[i] = seq.num_computed_tokens + 1
            decode_tables[i, : len(seq.block_table)] = seq.block_table
        query_start_list = list(itertools.accumulate((n for _, n in prefills), initial=0))
        seq_lens_list = [s.num_computed_tokens + n for s, n in prefills]
        query_start[:] = query_start_list
        seq_lens[:] = seq_lens_list
        for i, (seq, _) in enumerate(prefills):
            prefill_tables[i, : len(seq.block_table)] = seq.block_table
        longs_t, ints_t = self._long_staging.to_device(longs), self._int_staging.to_device(ints)
        ints_parts = [ints_t[off : off + n] for off, n in zip(int_offsets, sizes)]
        long_parts = [longs_t[off : off + num_tokens] for off in long_offsets[:3]]
        meta = AttentionMetadata(
            slot_mapping=long_parts[2],
            num_decode_tokens=num_decode,
            decode_block_tables=ints_parts[1].view(num_decode, decode_width),
            decode_context_lens=ints_parts[0],
            prefill_block_tables=ints_parts[4].view(num_prefills, prefill_width),
            prefill_query_start_loc=query_start_list,
            prefill_seq_lens=seq_lens_list,
            prefill_query_start_loc_t=ints_parts[2],
            prefill_seq_lens_t=ints_parts[3],
            max_prefill_query_len=max((n for _, n in prefills), default=0),
        )
        return PreparedBatch(
            input_ids=long_parts[0],
            positions=long_parts[1],
            meta=meta,
            num_prefills=num_prefills,
            sample_rows=longs_t[long_offsets[3] : long_offsets[3] + num_sampled],
            sample_seqs=sample_seqs,
        )


class HostStaging:
    """Host memory for one step's inputs of one dtype, reused from step to step.

    On CUDA it is one pinned buffer, so the host-to-device copy is a single DMA without a pinning copy;
    the buffer is rewritten only after the previous step's copy out of it has finished (a step that
    samples nothing never waits on the device, so the next one could otherwise overwrite it in flight).
    Elsewhere every step gets fresh memory, as the returned tensors alias it.
    """

    def __init__(self, dtype: np.dtype, device: torch.device):
        self.dtype, self.device = np.dtype(dtype), device
        self._pinned: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def zeros(self, n: int) -> np.ndarray:
        if self.device.type != "cuda":
            return np.zeros(n, dtype=self.dtype)
        if self._copied is not None:
            self._copied.synchronize()
        if self._pinned is None or self._pinned.numel() < n:
            capacity = max(n, 2 * (0 if self._pinned is None else self._pinned.numel()), 4096)
            torch_dtype = torch.from_numpy(np.zeros(0, dtype=self.dtype)).dtype
            self._pinned = torch.empty(capacity, dtype=torch_dtype, pin_memory=True)
        array = self._pinned[:n].numpy()
        array.fill(0)
        return array

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """``array`` is the latest ``zeros`` result, filled in."""
        if self.device.type != "cuda":
            return torch.from_numpy(array)
        tensor = self._pinned[: array.shape[0]].to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return tensor


def _aligned_offsets(sizes: list[int], itemsize: int) -> list[int]:
    """Start offsets of consecutive parts of one buffer, each part starting on a 16-byte boundary, plus
    the total length. Triton specializes kernels on pointer alignment: unaligned views of a packed buffer
    would compile new variants (about a second each) whenever the parts' sizes change."""
    per_line = 16 // itemsize
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + -(-n // per_line) * per_line)
    return offsets


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    num_prefills: int
    sample_rows: torch.Tensor  # rows of the hidden states to sample from, one per entry of sample_seqs
    sample_seqs: list[Sequence]


@torch.no_grad()
def _init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    for i, (name, p) in enumerate(model.named_parameters()):
        gen = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.uniform_(-0.02, 0.02, generator=gen)
