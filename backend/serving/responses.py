"""Output tensors of one response, named and typed by serving/schema.py (Triton's vLLM-backend names)."""

from __future__ import annotations

import json

import numpy as np

from pagetron.backend.engine.outputs import CompletionOutput, RequestOutput
from pagetron.backend.serving.request_parser import ParsedRequest
from pagetron.backend.serving.schema import OUTPUTS_BY_NAME


class ResponseBuilder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @staticmethod
    def merge(pending: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
        """Joins a DELTA output onto what a non-streaming request has gathered so far, in place (the
        delta's lists are its own, so extending them costs only the new tokens)."""
        if pending is None:
            return delta
        for old, new in zip(pending.outputs, delta.outputs):
            old.text += new.text
            old.token_ids.extend(new.token_ids)
            old.delta_text += new.delta_text
            old.delta_token_ids = old.delta_token_ids + new.delta_token_ids
            if new.logprobs is not None:
                old.logprobs = old.logprobs if old.logprobs is not None else []
                old.logprobs.extend(new.logprobs)
            old.cumulative_logprob = new.cumulative_logprob
            old.finish_reason, old.stop_reason = new.finish_reason, new.stop_reason
        pending.finished, pending.num_cached_tokens = delta.finished, delta.num_cached_tokens
        return pending

    def tensors(self, parsed: ParsedRequest, out: RequestOutput) -> dict[str, np.ndarray]:
        outputs = sorted(out.outputs, key=lambda o: o.index)
        texts = [o.text for o in outputs]
        if not parsed.stream and not parsed.exclude_input_in_output:
            prompt = out.prompt if out.prompt is not None else self._decode(out.prompt_token_ids)
            texts = [prompt + t for t in texts]
        values: dict[str, list] = {
            "text_output": [t.encode("utf-8") for t in texts],
            "output_ids": [t for o in outputs for t in o.token_ids],
        }
        if parsed.return_finish_reason:  # "None" until an output finishes, as the vLLM backend sends it
            values["finish_reason"] = [str(o.finish_reason).encode() for o in outputs]
        if parsed.return_cumulative_logprob:
            values["cumulative_logprob"] = [o.cumulative_logprob for o in outputs]
        if parsed.return_logprobs:
            values["logprobs"] = [_logprobs_json(o).encode() for o in outputs]
        if parsed.return_num_input_tokens:
            values["num_input_tokens"] = [len(out.prompt_token_ids)]
        if parsed.return_num_output_tokens:
            values["num_output_tokens"] = [len(o.token_ids) for o in outputs]
        return {name: np.array(v, dtype=OUTPUTS_BY_NAME[name].numpy_dtype) for name, v in values.items()}

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""


def _logprobs_json(output: CompletionOutput) -> str:
    """Per generated token: {token_id: {"logprob", "rank", "decoded_token"}}, as the vLLM backend sends it;
    null when the request asked for no logprobs."""
    if output.logprobs is None:
        return "null"
    steps = [
        {
            str(tid): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
            for tid, lp in s.items()
        }
        for s in output.logprobs or []
    ]
    return json.dumps(steps)
