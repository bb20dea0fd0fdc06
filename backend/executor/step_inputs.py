"""One step's model inputs, named, built on the host in two packed buffers and sent in two copies.

Layout of the host buffers (each part starts on a 16-byte boundary, see ``aligned_offsets``)::

    int64: [ input ids (T) | positions (T) | slots (T) | rows to sample (S) ]
    int32: [ decode context lens (D) | decode block tables (D x Wd) | prefill query starts (P + 1)
             | prefill seq lens (P) | prefill block tables (P x Wp) ]

T tokens (decodes first), D decode rows, P prefill chunks, S sampled rows. Building in numpy and copying
two buffers beats per-tensor copies of Python lists, which cost milliseconds at a few hundred sequences.
The two buffers plus ``StepShape`` are all a step needs, which is what a multi-process executor would
send to its other ranks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from pagetron.backend.core.step import SchedulerOutput
from pagetron.backend.model.layers.attention import AttentionMetadata


@dataclass(frozen=True)
class StepShape:
    num_tokens: int
    num_decodes: int
    num_prefills: int
    num_sampled: int
    decode_width: int  # blocks per decode row of the block table
    prefill_width: int
    prefill_query_starts: tuple[int, ...]  # host copies: the reference attention and kernels' grids read them
    prefill_seq_lens: tuple[int, ...]

    def long_sizes(self) -> list[int]:
        return [self.num_tokens] * 3 + [self.num_sampled]

    def int_sizes(self) -> list[int]:
        d, p = self.num_decodes, self.num_prefills
        return [d, d * self.decode_width, p + 1, p, p * self.prefill_width]


@dataclass
class HostStepInputs:
    """A step's inputs on the host: what a multi-process executor sends to its other ranks."""

    shape: StepShape
    longs: np.ndarray  # int64
    ints: np.ndarray  # int32
    # (row, seq id) of input tokens still pending (sampled by the step in flight, not known on the host):
    # their ids are filled on the device from that step's samples (asynchronous scheduling)
    pending: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class StepInputs:
    """The device tensors of one step."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    sample_rows: torch.Tensor  # [S] int64: rows of the hidden states to sample from
    meta: AttentionMetadata
    shape: StepShape

    @property
    def is_decode_only(self) -> bool:
        return self.shape.num_prefills == 0


class StepInputBuilder:
    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        self._longs = HostStaging(np.int64, device)
        self._ints = HostStaging(np.int32, device)

    def build(self, out: SchedulerOutput) -> HostStepInputs:
        shape = self._shape(out)
        long_offsets = aligned_offsets(shape.long_sizes(), itemsize=8)
        int_offsets = aligned_offsets(shape.int_sizes(), itemsize=4)
        longs = self._longs.zeros(long_offsets[-1])
        ints = self._ints.zeros(int_offsets[-1])
        pending = self._fill(out, shape, _parts(longs, long_offsets, shape.long_sizes()),
                             _parts(ints, int_offsets, shape.int_sizes()))  # fmt: skip
        return HostStepInputs(shape, longs, ints, pending)

    def to_device(self, host: HostStepInputs) -> StepInputs:
        """``host`` is the latest ``build`` result, or (on another rank) the buffers it was sent."""
        shape = host.shape
        longs_t, ints_t = self._longs.to_device(host.longs), self._ints.to_device(host.ints)
        return _step_inputs(
            shape,
            _parts(longs_t, aligned_offsets(shape.long_sizes(), itemsize=8), shape.long_sizes()),
            _parts(ints_t, aligned_offsets(shape.int_sizes(), itemsize=4), shape.int_sizes()),
        )

    def _shape(self, out: SchedulerOutput) -> StepShape:
        d = out.num_decodes
        prefills = list(zip(out.seqs[d:], out.num_new_tokens[d:]))
        return StepShape(
            num_tokens=out.num_tokens,
            num_decodes=d,
            num_prefills=len(prefills),
            num_sampled=len(out.sample_indices),
            decode_width=max((len(s.block_table) for s in out.seqs[:d]), default=0),
            prefill_width=max((len(s.block_table) for s, _ in prefills), default=0),
            prefill_query_starts=tuple(itertools.accumulate((n for _, n in prefills), initial=0)),
            prefill_seq_lens=tuple(c + n for c, n in zip(out.num_computed[d:], out.num_new_tokens[d:])),
        )

    def _fill(self, out: SchedulerOutput, shape: StepShape, longs: list[np.ndarray], ints: list[np.ndarray]):
        bs, d = self.block_size, shape.num_decodes
        ids, positions, slots, sample_rows = longs
        context_lens, decode_tables, query_starts, seq_lens, prefill_tables = ints
        decode_tables = decode_tables.reshape(d, shape.decode_width)
        prefill_tables = prefill_tables.reshape(shape.num_prefills, shape.prefill_width)
        row_of_entry = []  # the token row whose hidden state an entry would be sampled from
        pending: list[tuple[int, int]] = []
        for i, seq in enumerate(out.seqs[:d]):
            pos = out.num_computed[i]
            if pos < seq.num_tokens:
                ids[i] = seq.token_ids[pos]
            else:
                pending.append((i, seq.seq_id))
            positions[i] = pos
            slots[i] = seq.block_table[pos // bs] * bs + pos % bs
            context_lens[i] = pos + 1
            decode_tables[i, : len(seq.block_table)] = seq.block_table
            row_of_entry.append(i)
        offset = d
        for i, (seq, n) in enumerate(zip(out.seqs[d:], out.num_new_tokens[d:])):
            start = out.num_computed[d + i]
            known = seq.token_ids[start : start + n]
            ids[offset : offset + len(known)] = known
            pending += [(offset + j, seq.seq_id) for j in range(len(known), n)]
            pos = np.arange(start, start + n, dtype=np.int64)
            positions[offset : offset + n] = pos
            table = np.asarray(seq.block_table, dtype=np.int64)
            slots[offset : offset + n] = table[pos // bs] * bs + pos % bs
            prefill_tables[i, : len(seq.block_table)] = seq.block_table
            offset += n
            row_of_entry.append(offset - 1)
        sample_rows[:] = [row_of_entry[i] for i in out.sample_indices]
        query_starts[:] = shape.prefill_query_starts
        seq_lens[:] = shape.prefill_seq_lens
        return pending


def _step_inputs(shape: StepShape, longs: list[torch.Tensor], ints: list[torch.Tensor]) -> StepInputs:
    ids, positions, slots, sample_rows = longs
    context_lens, decode_tables, query_starts, seq_lens, prefill_tables = ints
    starts = shape.prefill_query_starts
    meta = AttentionMetadata(
        slot_mapping=slots,
        num_decode_tokens=shape.num_decodes,
        decode_block_tables=decode_tables.view(shape.num_decodes, shape.decode_width),
        decode_context_lens=context_lens,
        prefill_block_tables=prefill_tables.view(shape.num_prefills, shape.prefill_width),
        prefill_query_start_loc=list(starts),
        prefill_seq_lens=list(shape.prefill_seq_lens),
        prefill_query_start_loc_t=query_starts,
        prefill_seq_lens_t=seq_lens,
        max_prefill_query_len=max((b - a for a, b in zip(starts, starts[1:])), default=0),
    )
    return StepInputs(ids, positions, sample_rows, meta, shape)


def _parts(buffer, offsets: list[int], sizes: list[int]) -> list:
    return [buffer[off : off + n] for off, n in zip(offsets, sizes)]


def aligned_offsets(sizes: list[int], itemsize: int) -> list[int]:
    """Start offsets of consecutive parts of one buffer, each part starting on a 16-byte boundary, plus
    the total length. Triton specializes kernels on pointer alignment: unaligned views of a packed buffer
    would compile new variants (about a second each) whenever the parts' sizes change."""
    per_line = 16 // itemsize
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + -(-n // per_line) * per_line)
    return offsets


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
        """``array`` is the latest ``zeros`` result, filled in (or any array, copied through the buffer)."""
        if self.device.type != "cuda":
            return torch.from_numpy(array)
        if self._pinned is None or array.ctypes.data != self._pinned.data_ptr():
            self.zeros(array.shape[0])[:] = array  # received from another rank: stage it first
        tensor = self._pinned[: array.shape[0]].to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return tensor
