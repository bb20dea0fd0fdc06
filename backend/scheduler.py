"""Continuous batching: decides, at every step, which sequences run and how many tokens each computes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from math import ceil

from pagetron.backend.block_manager import BlockManager
from pagetron.backend.sampler import SamplerOutput
from pagetron.backend.sequence import Sequence, SequenceStatus

USAGE_WINDOW = 64  # finished sequences whose used share of max_tokens sets the growth reservation


@dataclass
class ScheduledBatch:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


@dataclass
class SequenceUpdate:
    """What one step did to one sequence: the tokens it gained and whether it finished."""

    seq: Sequence
    new_token_ids: list[int]
    finished: bool


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] | list[int] = (),
        enable_chunked_prefill: bool = True,
        reserve_kv_for_growth: bool = True,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.enable_chunked_prefill = enable_chunked_prefill
        self.reserve_kv_for_growth = reserve_kv_for_growth
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # fractions of their allowed output that recently finished sequences used (see growth_ratio)
        self._used_fractions: deque[float] = deque(maxlen=USAGE_WINDOW)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # Running sequences first, oldest first; when blocks run out the newest running one is preempted.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.scheduled.append((seq, num_new))
                budget -= num_new
                i += 1
                continue
            break
        # NOTE: no new admissions in a step that had to preempt: memory is short, let running work drain.
        if batch.preempted:
            return batch
        ratio, reserved = self.growth_ratio, 0
        if self.reserve_kv_for_growth:
            reserved = sum(self._growth_blocks(s, len(s.block_table), ratio) for s in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit_blocks, num_hit_tokens = self.block_manager.get_computed_blocks(seq)
            num_new = seq.num_tokens - num_hit_tokens
            if num_new > budget and not self.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if self.reserve_kv_for_growth:
                taken = self.block_manager.num_blocks_to_take(seq, num_new, hit_blocks)
                held = -(-(num_hit_tokens + num_new) // self.block_manager.block_size)
                growth = self._growth_blocks(seq, held, ratio)
                if self.running and self.block_manager.num_free_blocks - taken < reserved + growth:
                    break
                reserved += growth
            if not self.block_manager.allocate_slots(seq, num_new, hit_blocks):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = num_hit_tokens
            seq.num_cached_tokens = num_hit_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.scheduled.append((seq, num_new))
            budget -= num_new
        return batch

    # NOTE on admission: a running sequence grows by one token per step, and when the pool runs dry the
    # newest one is preempted and recomputed, which throws away its prefill. So a waiting sequence is
    # admitted only if the blocks left free afterwards cover the expected growth of everything running:
    # each sequence may still grow to its prompt + max_tokens (or max_model_len), scaled by the share of
    # their allowance that recently finished sequences actually used (1.0 until one finishes). Requests
    # that stop at EOS long before max_tokens thus soon reserve little; a workload that always runs to
    # max_tokens reserves everything and is never preempted. Nothing is admitted past this check while
    # blocks are short, but an idle engine always admits its first sequence.
    @property
    def growth_ratio(self) -> float:
        if not self._used_fractions:
            return 1.0
        return sum(self._used_fractions) / len(self._used_fractions)

    def _growth_blocks(self, seq: Sequence, num_blocks_held: int, ratio: float) -> int:
        """Blocks ``seq`` is expected to need beyond the ``num_blocks_held`` it has (or is about to get)."""
        need = -(-self._final_len(seq) // self.block_manager.block_size) - num_blocks_held
        return ceil(ratio * need) if need > 0 else 0

    def _final_len(self, seq: Sequence) -> int:
        max_tokens = seq.sampling_params.max_tokens
        if max_tokens is None:
            return self.max_model_len
        return min(seq.num_prompt_tokens + max_tokens, self.max_model_len)

    def _preempt(self, seq: Sequence) -> None:
        # Recompute preemption: drop the KV, keep the tokens; the sequence re-prefills prompt + output later.
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(
        self, batch: ScheduledBatch, sampled_seqs: list[Sequence], samples: SamplerOutput
    ) -> list[SequenceUpdate]:
        for seq, num_new in batch.scheduled:
            seq.num_computed_tokens += num_new
        updates = []
        for row, seq in enumerate(sampled_seqs):
            if seq.is_finished:  # finished from outside (abort, stop string) while this step ran
                continue
            token = samples.token_ids[row]
            seq.append_token(token)
            seq.cumulative_logprob += samples.sampled_logprobs[row]
            if samples.logprobs[row] is not None:
                seq.logprobs.append(samples.logprobs[row])
            finish = self._finish_reason(seq, token)
            if finish is not None:
                self.finish(seq, finish)
            updates.append(SequenceUpdate(seq, [token], seq.is_finished))
        return updates

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.sampling_params
        if seq.num_output_tokens >= params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                return "stop"
            if params.stop_token_ids and token in params.stop_token_ids:
                seq.stop_reason = token
                return "stop"
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (normally, by abort or by a stop string) and frees its blocks at once."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        allowed = self._final_len(seq) - seq.num_prompt_tokens
        if reason != "abort" and allowed > 0:
            self._used_fractions.append(min(1.0, seq.num_output_tokens / allowed))
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
