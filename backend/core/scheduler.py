"""Continuous batching: decides, at every step, which sequences run and how many tokens each computes,
and applies what the step produced. ``update()`` (and ``abort()``) are the only places a sequence ends."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from math import ceil
from typing import Any

from pagetron.backend.core.block_manager import BlockManager
from pagetron.backend.core.sequence import Sequence, SequenceStatus
from pagetron.backend.core.step import (
    GrammarMask,
    MaskStats,
    RunnerOutput,
    SchedulerOutput,
    SequenceUpdate,
    fill_each,
)

logger = logging.getLogger(__name__)

USAGE_WINDOW = 64  # finished sequences whose used share of max_tokens sets the growth reservation


class SchedulerStuck(RuntimeError):
    """Requests wait, nothing runs, and none of them fits the idle KV cache."""


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
        max_loras: int = 0,
        vocab_size: int = 0,
        fill_bitmasks: Callable[[list[Any], Any], None] = fill_each,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.enable_chunked_prefill = enable_chunked_prefill
        self.reserve_kv_for_growth = reserve_kv_for_growth
        self.max_loras = max_loras  # distinct LoRA adapters the running sequences may use (device slots)
        # int32 words of a grammar's token bitmask row: vocab_size is the ids a grammar covers (the engine's
        # grammar_vocab_size; the model's padded ids past them are forbidden where masks are applied)
        self.bitmask_width = -(-vocab_size // 32)
        self.fill_bitmasks = fill_bitmasks  # (grammar states, bitmask) -> one row per state
        self.mask_stats = MaskStats()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._finished_seq_ids: list[int] = []  # ended since the last schedule(); told to the executor
        # fractions of their allowed output that recently finished sequences used (see growth_ratio)
        self._used_fractions: deque[float] = deque(maxlen=USAGE_WINDOW)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """The next step: running sequences first (oldest first), then waiting ones, within the token
        budget. Raises SchedulerStuck if requests wait but none can ever start."""
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        budget = self.max_num_batched_tokens
        # Running sequences first, oldest first; when blocks run out the newest running one is preempted.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending_tokens and not self._may_run_ahead(seq):
                i += 1
                continue
            num_new = min(seq.num_tokens + seq.num_pending_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, num_new))
                budget -= num_new
                i += 1
                continue
            break
        # NOTE: no new admissions in a step that had to preempt: memory is short, let running work drain.
        if preempted:
            return self._output(scheduled, preempted)
        ratio, reserved = self.growth_ratio, 0
        if self.reserve_kv_for_growth and self.waiting:  # only admissions read it
            reserved = sum(self._growth_blocks(s, len(s.block_table), ratio) for s in self.running)
        # passed over: waiting for an adapter slot or for their grammar to compile; they keep their place
        passed_over: list[Sequence] = []
        adapter_waits = False  # a request passed over for an adapter slot (see _adapter_may_start)
        adapters: set[int] | None = None  # the running sequences' adapters, gathered when first needed
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending_tokens:  # preempted with a token still in flight: its prompt is not whole yet
                break
            if seq.grammar is not None and not seq.grammar.ready:
                passed_over.append(self.waiting.popleft())
                continue
            if seq.lora is not None:
                if adapters is None:
                    adapters = {s.lora.lora_int_id for s in self.running if s.lora is not None}
                if not self._adapter_may_start(seq, adapter_waits, adapters):
                    adapter_waits = True
                    passed_over.append(self.waiting.popleft())
                    continue
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
            scheduled.append((seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(passed_over))
        if not scheduled and self.waiting and not self.running and not self.num_compiling():
            raise SchedulerStuck("no waiting request fits the idle KV cache")
        return self._output(scheduled, preempted)

    # NOTE on adapter slots: the running sequences use at most max_loras distinct adapters. A waiting
    # request whose adapter would be one too many waits; behind it only base-model requests go ahead, not
    # more requests for the adapters already running, so those drain and it gets its slot (no starvation).
    def _adapter_may_start(self, seq: Sequence, adapter_waits: bool, running: set[int]) -> bool:
        """True if ``seq`` may start; then its adapter joins ``running`` (it is admitted next, unless blocks
        run out, and a set one too large only makes this step admit fewer adapters)."""
        if adapter_waits:
            return False
        if seq.lora.lora_int_id in running or len(running) < self.max_loras:
            running.add(seq.lora.lora_int_id)
            return True
        return False

    def _output(self, scheduled: list[tuple[Sequence, int]], preempted: list[Sequence]) -> SchedulerOutput:
        """Lays the step out in rows (decodes first) and marks the entries that reach their last token."""
        ordered = [e for e in scheduled if e[1] == 1] + [e for e in scheduled if e[1] != 1]
        out = SchedulerOutput(
            seqs=[seq for seq, _ in ordered],
            num_new_tokens=[n for _, n in ordered],
            num_computed=[seq.num_computed_tokens for seq, _ in ordered],
            num_decodes=sum(1 for _, n in ordered if n == 1),
            sample_indices=[
                i
                for i, (seq, n) in enumerate(ordered)
                if seq.num_computed_tokens + n == seq.num_tokens + seq.num_pending_tokens
            ],
            preempted=preempted,
            finished_seq_ids=self._finished_seq_ids,
        )
        self._finished_seq_ids = []
        out.grammar = self._grammar_mask(out.sampled_seqs)
        for seq, n in ordered:  # the step's positions count as computed from now on
            seq.num_computed_tokens += n
        for seq in out.sampled_seqs:
            seq.num_pending_tokens += 1
        return out

    def num_compiling(self) -> int:
        """Waiting sequences whose grammar is still compiling (nothing else keeps them waiting)."""
        return sum(1 for s in self.waiting if s.grammar is not None and not s.grammar.ready)

    # NOTE on grammars: a constrained row's mask comes from its matcher, which has seen every token so
    # far (update() advances it), filled on the host while the step's forward pass runs (GrammarMask);
    # the sampler applies the masks on the device in one op. A constrained sequence that runs ahead
    # (asynchronous scheduling) is sampled only after update() has applied its pending token: the runner
    # defers that step's sampling (ModelRunner.launch).
    def _grammar_mask(self, sampled: list[Sequence]) -> GrammarMask | None:
        rows = [row for row, seq in enumerate(sampled) if seq.grammar is not None]
        if not rows:
            return None
        states = [sampled[row].grammar for row in rows]
        return GrammarMask(rows, states, self.bitmask_width, self.fill_bitmasks, self.mask_stats)

    # NOTE on running ahead (asynchronous scheduling): the next step may be scheduled while this one runs,
    # so a sequence can be scheduled with its last token still pending (its id comes from the previous
    # step's samples, on the device). That is safe when the pending token cannot end the sequence by
    # length (known in advance; EOS, stop strings and a completed grammar are found one step late and
    # the extra row is dropped) and when sampling the next token needs no output history on the host
    # (penalties; a grammar's mask waits for update(), see the NOTE on grammars).
    def _may_run_ahead(self, seq: Sequence) -> bool:
        params = seq.sampling_params
        outputs = seq.num_output_tokens + seq.num_pending_tokens
        if params.max_tokens is not None and outputs >= params.max_tokens:
            return False
        if seq.num_tokens + seq.num_pending_tokens >= self.max_model_len:
            return False
        return seq.num_pending_tokens < 2 and not params.uses_output_history

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

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[SequenceUpdate]:
        """Applies a step's result: appends each sampled token and ends the sequences it finishes (EOS,
        stop token, stop string, length). A sequence that ended while the step ran is skipped; one
        preempted while it ran still gets its token (it re-prefills with it)."""
        updates = []
        for row, index in enumerate(out.sample_indices):
            seq = out.seqs[index]
            seq.num_pending_tokens -= 1
            if seq.is_finished:  # aborted, or ended by the previous step's token (this row ran ahead)
                continue
            token = result.token_ids[row]
            seq.append_token(token)
            seq.cumulative_logprob += result.sampled_logprobs[row]
            if result.logprobs[row] is not None:
                seq.logprobs.append(result.logprobs[row])
            if seq.grammar is not None and not seq.grammar.accept(token):  # the mask forbade it: a bug
                logger.error("sequence %s sampled token %d outside its grammar; ending it", seq.seq_id, token)
                self._finish(seq, "abort")
                updates.append(SequenceUpdate(seq, [token]))
                continue
            reason, stop_reason = self._check_stop(seq, token)
            if reason is not None:
                self._finish(seq, reason, stop_reason)
            updates.append(SequenceUpdate(seq, [token]))
        return updates

    def abort(self, seqs: list[Sequence]) -> None:
        """Ends sequences at once (the client left, or the engine gives up on them) and frees their blocks."""
        for seq in seqs:
            self._finish(seq, "abort")

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, int | str | None]:
        """(finish reason, stop reason) after ``token`` was appended; (None, None) if the sequence goes on.
        The detokenizer sees every token; a stop string it finds wins over EOS or length, as in vLLM."""
        params = seq.sampling_params
        reason: str | None = None
        stop_reason: int | str | None = None
        if seq.num_output_tokens >= params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                reason = "stop"
            elif params.stop_token_ids and token in params.stop_token_ids:
                reason, stop_reason = "stop", token
        if reason is None and seq.grammar is not None and seq.grammar.is_terminated():
            reason = "stop"  # the grammar is complete and took its stop token (EOS), ignore_eos or not
        if reason is None and (
            (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens)
            or seq.num_tokens >= self.max_model_len
        ):
            reason = "length"
        if seq.detokenizer is not None:
            stop = seq.detokenizer.update(
                [token], stop_terminated=reason == "stop", finished=reason is not None
            )
            if stop is not None:
                reason, stop_reason = "stop", stop
        return reason, stop_reason

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """The one place a sequence ends: its finish reason is written here and its blocks freed."""
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        allowed = self._final_len(seq) - seq.num_prompt_tokens
        if reason != "abort" and allowed > 0:
            self._used_fractions.append(min(1.0, seq.num_output_tokens / allowed))
        self.block_manager.free(seq)
        self._finished_seq_ids.append(seq.seq_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
