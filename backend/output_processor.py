"""Turns per-sequence token updates into RequestOutputs: incremental text, stop strings, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from pagetron.backend.detokenizer import IncrementalDetokenizer
from pagetron.backend.outputs import CompletionOutput, Logprob, RequestOutput
from pagetron.backend.scheduler import SequenceUpdate
from pagetron.backend.sequence import Sequence


class OutputKind(Enum):
    """What outputs carry (as in vLLM): everything so far, only the new part, or one final output."""

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class _SeqState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    num_tokens_sent: int = 0
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
        self.seqs = [
            _SeqState(
                s,
                IncrementalDetokenizer(tokenizer, s.prompt_token_ids, s.sampling_params)
                if tokenizer
                else None,
            )
            for s in seqs
        ]

    @property
    def finished(self) -> bool:
        return all(st.seq.is_finished for st in self.seqs)

    def make_output(self) -> RequestOutput:
        delta_only = self.output_kind == OutputKind.DELTA
        outputs = []
        for st in self.seqs:
            seq = st.seq
            delta = st.detokenizer.get_delta(finished=seq.is_finished) if st.detokenizer is not None else ""
            st.text += delta
            new_token_ids = seq.output_token_ids[st.num_tokens_sent :]
            params = seq.sampling_params
            if params.logprobs is not None:
                self._decode_logprobs(st)
            logprobs = None
            if params.logprobs is not None:
                logprobs = st.logprobs[st.num_tokens_sent :] if delta_only else list(st.logprobs)
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=delta if delta_only else st.text,
                    token_ids=list(new_token_ids) if delta_only else list(seq.output_token_ids),
                    cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None else None,
                    logprobs=logprobs,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    delta_text=delta,
                    delta_token_ids=new_token_ids,
                )
            )
            st.num_tokens_sent = seq.num_output_tokens
        cached = min(st.seq.num_cached_tokens for st in self.seqs)
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished, cached
        )

    def _decode_logprobs(self, st: _SeqState) -> None:
        tok = self.tokenizer
        for step in st.seq.logprobs[len(st.logprobs) :]:
            st.logprobs.append(
                {
                    tid: Logprob(lp, rank, tok.decode([tid]) if tok is not None else None)
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

    def process(self, updates: list[SequenceUpdate]) -> tuple[list[RequestState], list[tuple[Sequence, str]]]:
        """Feeds new tokens to the detokenizers. Returns the requests that changed and the sequences a stop
        string has ended (with that string), which the engine must finish before its next step."""
        touched: dict[str, RequestState] = {}
        stopped = []
        for update in updates:
            state = self.requests.get(update.seq.request_id)
            if state is None:
                continue
            touched[state.request_id] = state
            st = state.seqs[update.seq.index]
            if st.detokenizer is None:
                continue
            seq = update.seq
            stop = st.detokenizer.update(
                update.new_token_ids,
                stop_terminated=update.finished and seq.finish_reason == "stop",
                finished=update.finished,
            )
            if stop is not None and not update.finished:
                stopped.append((update.seq, stop))
            elif stop is not None:
                # The sequence ended on this very token (EOS/length), but the stop string wins, as in vLLM.
                update.seq.finish_reason, update.seq.stop_reason = "stop", stop
        return list(touched.values()), stopped

    def pop_finished(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
