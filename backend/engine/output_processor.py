"""Turns per-sequence token updates into RequestOutputs: incremental text, logprobs, what is new."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from pagetron.backend.core.detokenizer import decode_full
from pagetron.backend.core.sequence import Sequence
from pagetron.backend.core.step import SequenceUpdate
from pagetron.backend.engine.outputs import CompletionOutput, Logprob, RequestOutput


class OutputKind(Enum):
    """What outputs carry (as in vLLM): everything so far, only the new part, or one final output."""

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class _Sent:
    """How much of one sequence's output has gone out."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # decoded once, kept


class RequestState:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        seqs: list[Sequence],
        tokenizer,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
    ):
        self.request_id = request_id
        self.output_kind = output_kind
        self.prompt = prompt
        self.prompt_token_ids = seqs[0].prompt_token_ids
        self.tokenizer = tokenizer
        self.seqs = seqs
        self._sent = [_Sent() for _ in seqs]

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def make_output(self) -> RequestOutput:
        delta_only = self.output_kind == OutputKind.DELTA
        outputs = []
        for seq, sent in zip(self.seqs, self._sent):
            detok = seq.detokenizer
            delta = detok.get_delta(finished=seq.is_finished) if detok is not None else ""
            sent.text += delta
            first_output = seq.num_prompt_tokens
            new_token_ids = seq.token_ids[first_output + sent.num_tokens :]
            params = seq.sampling_params
            logprobs = None
            if params.logprobs is not None:
                self._decode_logprobs(seq, sent)
                logprobs = sent.logprobs[sent.num_tokens :] if delta_only else list(sent.logprobs)
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=delta if delta_only else sent.text,
                    token_ids=list(new_token_ids) if delta_only else seq.token_ids[first_output:],
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=logprobs,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    delta_text=delta,
                    delta_token_ids=new_token_ids,
                )
            )
            sent.num_tokens = seq.num_output_tokens
        cached = min(seq.num_cached_tokens for seq in self.seqs)
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished, cached
        )

    def _decode_logprobs(self, seq: Sequence, sent: _Sent) -> None:
        tok = self.tokenizer
        for step in seq.logprobs[len(sent.logprobs) :]:
            sent.logprobs.append(
                {
                    tid: Logprob(lp, rank, decode_full(tok, [tid], False) if tok is not None else None)
                    for tid, (lp, rank) in step.items()
                }
            )


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        seqs: list[Sequence],
        output_kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> None:
        self.requests[request_id] = RequestState(request_id, prompt, seqs, self.tokenizer, output_kind)

    def request_ids(self) -> list[str]:
        return list(self.requests)

    def pop(self, request_id: str) -> RequestState | None:
        return self.requests.pop(request_id, None)

    def process(self, updates: list[SequenceUpdate]) -> list[RequestOutput]:
        """The outputs of the requests this step changed; a finished request is forgotten here."""
        touched = {u.seq.request_id: self.requests.get(u.seq.request_id) for u in updates}
        outputs = []
        for state in touched.values():
            if state is None:
                continue
            finished = state.finished
            if finished or state.output_kind != OutputKind.FINAL_ONLY:
                outputs.append(state.make_output())
            if finished:
                del self.requests[state.request_id]
        return outputs
