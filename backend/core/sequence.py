"""One generation stream: prompt + output token ids, scheduling state and its KV block table."""

from __future__ import annotations

import itertools
from enum import Enum, auto
from typing import TYPE_CHECKING

from pagetron.backend.core.lora import LoRARequest
from pagetron.backend.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagetron.backend.core.detokenizer import IncrementalDetokenizer
    from pagetron.backend.core.structured_outputs import GrammarState


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """A single sequence. A request with ``n > 1`` becomes ``n`` sequences sharing a request id.

    ``num_computed_tokens`` counts the tokens whose K/V are in the cache or being computed by a scheduled
    step (prefix-cache hits included); the scheduler advances it when it schedules a step, preemption
    resets it to 0. Only the scheduler changes a
    sequence's tokens and status; ``detokenizer`` (when the model has a tokenizer) turns its output into
    text as tokens arrive, which is where stop strings are found.
    """

    _ids = itertools.count()

    def __init__(
        self,
        token_ids: list[int],
        sampling_params: SamplingParams,
        request_id: str | None = None,
        index: int = 0,
        arrival_time: float = 0.0,
        cache_salt: str | None = None,
        detokenizer: IncrementalDetokenizer | None = None,
        lora: LoRARequest | None = None,
        grammar: GrammarState | None = None,
    ):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.index = index  # position among the request's n sequences
        self.sampling_params = sampling_params
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        # tokens sampled by scheduled steps whose results the scheduler has not applied yet: 1 while a
        # sampled step runs, 2 when the next step is scheduled before the previous one's result arrives
        # (asynchronous scheduling). Their positions are computed; their ids are not known here yet.
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at the last admission
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of this sequence's full blocks, filled lazily
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.arrival_time = arrival_time
        self.lora = lora  # the adapter this sequence runs with; None: the base model
        # extra key for prefix hashing: KV computed under one adapter is never another's
        self.cache_salt = cache_salt if lora is None else f"{cache_salt or ''}lora:{lora.lora_int_id}"
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, tuple[float, int]]] = []  # per output token: id -> (logprob, rank)
        self.detokenizer = detokenizer
        self.grammar = grammar  # constrained decoding: what the next token may be (its own matcher)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, status={self.status.name}, "
            f"tokens={len(self.token_ids)}, computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
