"""A generation request for the `llm` model and the input tensors it becomes (see serving/schema.py)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagetron.backend.serving.schema import INPUTS_BY_NAME, RETURN_FLAGS
from pagetron.client.errors import TritonRequestError

# Asks the server for an empty response carrying the final flag when the model's last data response
# lacked it, so a client can always tell when a request is done.
EMPTY_FINAL_RESPONSE_PARAM = "triton_enable_empty_final_response"
# Errors come back as gRPC status codes (INVALID_ARGUMENT, ...) and close the stream, instead of a bare
# error string inside an otherwise OK stream (Triton >= 24.08).
# No triton_grpc_error header: with it tritonserver 2.51 segfaults after a run of error-ended streams
# (seen under fuzzing); the model puts the error code in the message instead ("[INVALID_ARG] ...").
STREAM_HEADERS: dict[str, str] = {}


@dataclass(frozen=True)
class GenerateRequest:
    """`prompt` is text (sent as text_input), token ids (input_ids) or a chat conversation, a list of
    {"role", "content"} messages (messages, rendered with the model's chat template by the server)."""

    prompt: str | Sequence[int] | Sequence[Mapping[str, Any]]
    sampling_params: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = True
    exclude_input_in_output: bool = True
    return_finish_reason: bool = True
    return_cumulative_logprob: bool = False
    return_logprobs: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = True
    request_id: str = ""
    tools: Sequence[Mapping[str, Any]] | None = None  # OpenAI tools, rendered by the chat template


    def input_arrays(self) -> dict[str, np.ndarray]:
        """Tensor name -> numpy array, in send order. BYTES as object arrays of bytes, BOOL as np.bool_."""
        arrays: dict[str, np.ndarray] = {}
        if isinstance(self.prompt, str):
            arrays["text_input"] = _bytes_array(self.prompt)
        elif self.prompt and isinstance(self.prompt[0], Mapping):
            arrays["messages"] = _bytes_array(json.dumps([dict(m) for m in self.prompt]))
        else:
            ids = [int(t) for t in self.prompt]
            if any(not 0 <= t < 2**31 for t in ids):  # numpy 1.26 would wrap them silently
                raise ValueError(f"token ids must be in [0, 2**31); got {min(ids)}..{max(ids)}")
            arrays["input_ids"] = _array("input_ids", ids)
        if self.tools:
            arrays["tools"] = _bytes_array(json.dumps([dict(t) for t in self.tools]))
        arrays["stream"] = _array("stream", [self.stream])
        if self.sampling_params:
            arrays["sampling_parameters"] = _bytes_array(json.dumps(dict(self.sampling_params)))
        arrays["exclude_input_in_output"] = _array("exclude_input_in_output", [self.exclude_input_in_output])
        for flag in RETURN_FLAGS:
            if getattr(self, flag):
                arrays[flag] = _array(flag, [True])
        return arrays

    def infer_inputs(self) -> list[Any]:
        """The arrays as tritonclient.grpc.InferInput objects (used by the sync and asyncio clients); a
        request that cannot be encoded raises TritonRequestError INVALID_ARG, as the server would."""
        from tritonclient.grpc import InferInput
        from tritonclient.utils import np_to_triton_dtype

        try:
            arrays = self.input_arrays()
        except (ValueError, OverflowError) as e:  # UnicodeEncodeError included
            raise TritonRequestError(f"the request cannot be encoded: {e}", "INVALID_ARG") from None
        inputs = []
        for name, array in arrays.items():
            tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs


def _array(name: str, values: list) -> np.ndarray:
    return np.asarray(values, dtype=INPUTS_BY_NAME[name].numpy_dtype)


def _bytes_array(text: str) -> np.ndarray:
    return np.array([text.encode("utf-8")], dtype=np.object_)
