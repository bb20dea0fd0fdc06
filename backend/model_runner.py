"""Owns the weights and the KV cache; turns a scheduled batch into flattened model inputs and samples."""

from __future__ import annotations

import itertools
import logging

import torch

from pagetron.backend.config import EngineConfig
from pagetron.backend.cuda_graphs import DecodeGraphs
from pagetron.backend.layers.attention import AttentionMetadata
from pagetron.backend.loader import ModelFiles
from pagetron.backend.models.llama import LlamaForCausalLM
from pagetron.backend.models.model_config import ModelConfig
from pagetron.backend.sampler import Sampler, SamplerOutput
from pagetron.backend.sequence import Sequence

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
        self.num_kv_blocks = self._num_kv_blocks()
        self._allocate_kv_cache()
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and self.attention_backend == "triton" and not config.enforce_eager:
            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, min(config.max_num_seqs, 512), max_blocks, self.device)
            self.graphs.capture()
        self.sampler = Sampler(eos_token_ids, seed=config.seed)

    def _kv_bytes_per_block(self) -> int:
        c = self.model_config
        elem = torch.empty(0, dtype=self.dtype).element_size()
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
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        logger.info("KV cache: %d blocks of %d tokens", self.num_kv_blocks, self.block_size)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], SamplerOutput]:
        """Runs one forward over ``(sequence, number of new tokens)`` pairs and samples for every sequence
        whose chunk reaches its last known token. Returns those sequences and their samples, in order."""
        decodes = [(s, n) for s, n in scheduled if n == 1]
        prefills = [(s, n) for s, n in scheduled if n != 1]
        ordered = decodes + prefills
        input_ids, positions, slots, sample_rows, sample_seqs = [], [], [], [], []
        bs = self.block_size
        for seq, n in ordered:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            for pos in range(start, start + n):
                slots.append(seq.block_table[pos // bs] * bs + pos % bs)
            positions.extend(range(start, start + n))
            if start + n == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_seqs.append(seq)
        dev = self.device
        query_start = list(itertools.accumulate((n for _, n in prefills), initial=0))
        seq_lens = [s.num_computed_tokens + n for s, n in prefills]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decode_tokens=len(decodes),
            decode_block_tables=self._block_tables([s for s, _ in decodes]),
            decode_context_lens=torch.tensor(
                [s.num_computed_tokens + 1 for s, _ in decodes], dtype=torch.int32, device=dev
            ),
            prefill_block_tables=self._block_tables([s for s, _ in prefills]),
            prefill_query_start_loc=query_start,
            prefill_seq_lens=seq_lens,
            prefill_query_start_loc_t=torch.tensor(query_start, dtype=torch.int32, device=dev),
            prefill_seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_prefill_query_len=max((n for _, n in prefills), default=0),
        )
        ids_t = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        positions_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        if self.graphs is not None and not prefills and len(decodes) <= self.graphs.max_batch:
            hidden = self.graphs.run(
                ids_t, positions_t, meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens
            )
        else:
            hidden = self.model(ids_t, positions_t, meta)
        if not sample_seqs:
            return [], SamplerOutput([], [], [])
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])
        return sample_seqs, self.sampler(logits, sample_seqs)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max((len(s.block_table) for s in seqs), default=0)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).view(len(seqs), width)


@torch.no_grad()
def _init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    for i, (name, p) in enumerate(model.named_parameters()):
        gen = torch.Generator(device=p.device).manual_seed(seed * 100_003 + i)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.uniform_(-0.02, 0.02, generator=gen)
