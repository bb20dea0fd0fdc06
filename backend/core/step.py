"""The contract of one engine step: what the scheduler asks the executor to run, and what comes back.

Data flows one way: ``Scheduler.schedule() -> SchedulerOutput -> Executor.execute() -> RunnerOutput ->
Scheduler.update()``. The executor never changes a sequence; the scheduler applies the result.

Row layout of a step (the flattened tokens the model computes), decodes first::

    seqs:        [ d0  d1  d2 | p0 (chunk of 5)  | p1 (chunk of 3) ]
    tokens:      [ t   t   t  | t  t  t  t  t    | t  t  t         ]
    sampled:       ^   ^   ^                ^                 (p1's chunk stops short of its last token)
    sample_indices = [0, 1, 2, 3]  ->  RunnerOutput rows 0..3

A "decode" entry computes one token (a running sequence's last one, or a one-token prefill chunk); an
entry is sampled when its chunk reaches the sequence's last token. Scheduling a step advances each
entry's computed tokens at once and counts each sampled entry's token as pending until ``update``
applies it, so with asynchronous scheduling the next step can be scheduled first: a sequence then runs
with its last token pending, whose id the executor takes from the previous step's samples::

    seq (4 prompt tokens, 1 output known):   [ p p p p | o1 | o2? ]     o2 sampled by step N, pending
    step N+1 entry:   num_computed = 5 (position of o2), num_new_tokens = 1, input id = step N's sample
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagetron.backend.core.sequence import Sequence


@dataclass
class MaskStats:
    """Host time spent on grammar bitmasks (for benchmarks): filling them, and the part of that the step
    waited for (all of it when a mask is filled where it is read; less when the fill ran on a thread)."""

    steps: int = 0
    seconds: float = 0.0
    waited: float = 0.0
    on_thread: int = 0  # fills that ran on a thread (start_fill)


@dataclass
class GrammarMask:
    """The tokens each constrained row may sample. Bit ``j`` of word ``w`` in a bitmask row allows token
    ``32 * w + j``; rows not listed are unconstrained::

        rows    = [0, 2]                    sampled rows (RunnerOutput order) under a grammar
        bitmask = int32 [len(rows), ceil(vocab / 32)]

    NOTE: the bitmask is filled when first read, which the sampler does after the step's forward pass is
    queued: on a GPU the host fills the masks while the device computes. ``start_fill`` fills it on a
    thread instead (xgrammar releases the GIL), so the host's next work overlaps it too; the caller must
    not touch the grammar states until the bitmask has been read.
    """

    rows: list[int]
    states: list[Any]  # each row's GrammarState (core.structured_outputs)
    width: int
    fill: Callable[[list[Any], np.ndarray], None]  # fills one bitmask row per state
    stats: MaskStats | None = None
    _bitmask: np.ndarray | None = None
    _filling: threading.Thread | None = None
    _error: BaseException | None = None

    def start_fill(self) -> None:
        if self._bitmask is None and self._filling is None:
            # NOTE: a new thread, not a pool's: starting one hands it the GIL at once, where a pool's
            # worker would wait for the running thread's switch interval (5 ms) to begin
            self._filling = threading.Thread(target=self._fill_caught, name="pagetron-mask-fill")
            self._filling.start()
            if self.stats is not None:
                self.stats.on_thread += 1

    @property
    def bitmask(self) -> np.ndarray:
        if self._bitmask is None:
            started = time.perf_counter()
            if self._filling is None:
                self._fill()
            else:
                self._filling.join()
                self._filling = None
                if self._error is not None:
                    raise self._error
            if self.stats is not None:
                self.stats.waited += time.perf_counter() - started
        assert self._bitmask is not None
        return self._bitmask

    def _fill(self) -> None:
        started = time.perf_counter()
        bitmask = np.empty((len(self.rows), self.width), dtype=np.int32)
        self.fill(self.states, bitmask)
        if self.stats is not None:
            self.stats.steps += 1
            self.stats.seconds += time.perf_counter() - started
        self._bitmask = bitmask

    def _fill_caught(self) -> None:
        try:
            self._fill()
        except BaseException as e:  # noqa: BLE001 (raised again where the bitmask is read)
            self._error = e


def fill_each(states: list[Any], bitmask: np.ndarray) -> None:
    """The plain fill: one row per grammar state, in order."""
    for row, state in enumerate(states):
        state.fill_bitmask(bitmask, row)


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)  # row order: decodes, then prefill chunks
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each entry computes this step
    # each entry's first position (its computed tokens before this step); the sequence's own counter
    # already includes this step's tokens
    num_computed: list[int] = field(default_factory=list)
    num_decodes: int = 0  # the first num_decodes entries compute one token each
    sample_indices: list[int] = field(default_factory=list)  # entries sampled, in RunnerOutput row order
    preempted: list[Sequence] = field(default_factory=list)  # freed this step, back to waiting
    # sequences that ended since the previous step: an executor drops any state it keeps for them
    finished_seq_ids: list[int] = field(default_factory=list)
    grammar: GrammarMask | None = None  # filled by the scheduler once the rows are known

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def sampled_seqs(self) -> list[Sequence]:
        return [self.seqs[i] for i in self.sample_indices]

    def __bool__(self) -> bool:
        return bool(self.seqs)


@dataclass
class RunnerOutput:
    """One row per entry of ``SchedulerOutput.sample_indices``."""

    token_ids: list[int] = field(default_factory=list)
    sampled_logprobs: list[float] = field(default_factory=list)  # raw logprob of each sampled token
    # per row, when the request asked for logprobs: {token_id: (logprob, rank)} for the top-N plus the
    # sampled token (rank 1 = most likely); else None
    logprobs: list[dict[int, tuple[float, int]] | None] = field(default_factory=list)


@dataclass
class SequenceUpdate:
    """What one step did to one sequence: the tokens it gained (it may have finished with them)."""

    seq: Sequence
    new_token_ids: list[int]
