"""Turns per-sequence token updates into RequestOutputs: incremental text, stop strings, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

from pagetron.backend.detokenizer import IncrementalDetokenizer
from pagetron.backend.outputs import CompletionOutput, Logprob, RequestOutput
from pagetron.backend.scheduler import SequenceUpdate
from pagetron.backend.sequence import Sequence


@dataclass
class _SeqState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    num_tokens_sent: int = 0


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, seqs: list[Sequence], tokenizer):
        self.request_id = request_id
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
        outputs = []
        for st in self.seqs:
            seq = st.seq
            if st.detokenizer is not None:
                delta = st.detokenizer.get_delta(finished=seq.is_finished)
                st.text += delta
            else:
                delta = ""
            params = seq.sampling_params
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=st.text,
                    token_ids=list(seq.output_token_ids),
                    cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None else None,
                    logprobs=self._logprobs(seq) if params.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    delta_text=delta,
                    delta_token_ids=seq.output_token_ids[st.num_tokens_sent :],
                )
            )
            st.num_tokens_sent = seq.num_output_tokens
        cached = min(st.seq.num_cached_tokens for st in self.seqs)
        return RequestOutput(
            self.request_id, self.prompt, self.prompt_token_ids, outputs, self.finished, cached
        )

    def _logprobs(self, seq: Sequence) -> list[dict[int, Logprob]]:
        def decode(token_id: int) -> str | None:
            return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None

        return [
            {tid: Logprob(lp, rank, decode(tid)) for tid, (lp, rank) in step.items()} for step in seq.logprobs
        ]


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, seqs: list[Sequence]) -> None:
        self.requests[request_id] = RequestState(request_id, prompt, seqs, self.tokenizer)

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
                update.new_token_ids, stop_terminated=update.finished and seq.finish_reason == "stop"
            )
            if stop is not None and not update.finished:
                stopped.append((update.seq, stop))
            elif stop is not None:
                # The sequence ended on this very token (EOS/length), but the stop string wins, as in vLLM.
                update.seq.finish_reason, update.seq.stop_reason = "stop", stop
        return list(touched.values()), stopped

    def pop_finished(self, request_id: str) -> None:
        self.requests.pop(request_id, None)
