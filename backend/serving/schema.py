"""The `llm` model's tensor interface, defined once (Triton's vLLM-backend names, plus Pagetron's extras).

Used by the Triton model (``auto_complete_config`` declares these tensors, so config.pbtxt lists none, as
the vLLM backend does), by the request parser (which inputs exist and their types), by the response
builder (output names and types) and by pagetron.client (how a request becomes tensors). No torch here:
clients and the OpenAI frontend import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Triton wire datatype -> (config.pbtxt data_type, numpy dtype of the tensor)
_DTYPES = {
    "BYTES": ("TYPE_STRING", np.object_),
    "BOOL": ("TYPE_BOOL", np.bool_),
    "INT32": ("TYPE_INT32", np.int32),
    "UINT32": ("TYPE_UINT32", np.uint32),
    "FP32": ("TYPE_FP32", np.float32),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Triton's wire name: BYTES, BOOL, INT32, UINT32, FP32
    dims: tuple[int, ...]
    optional: bool = True

    @property
    def numpy_dtype(self) -> type:
        return _DTYPES[self.datatype][1]

    def model_config(self, is_input: bool) -> dict:
        """The entry auto_complete_config adds (the shape config.pbtxt would write)."""
        entry = {"name": self.name, "data_type": _DTYPES[self.datatype][0], "dims": list(self.dims)}
        if is_input:
            entry["optional"] = self.optional
        return entry


def _bool(name: str) -> TensorSpec:
    return TensorSpec(name, "BOOL", (1,))


# exactly one of these carries the prompt
PROMPT_INPUTS = (
    TensorSpec("text_input", "BYTES", (1,)),
    TensorSpec("input_ids", "INT32", (-1,)),  # Pagetron: token ids instead of text
    TensorSpec("messages", "BYTES", (1,)),  # Pagetron: a JSON chat, rendered with the model's template
)
RETURN_FLAGS = (
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
)
INPUTS = (
    *PROMPT_INPUTS,
    _bool("stream"),
    TensorSpec("sampling_parameters", "BYTES", (1,)),  # JSON object of SamplingParams keys
    TensorSpec("tools", "BYTES", (1,)),  # Pagetron: JSON list of OpenAI tools, for messages' chat template
    _bool("exclude_input_in_output"),
    *(_bool(flag) for flag in RETURN_FLAGS),
)
OUTPUTS = (
    TensorSpec("text_output", "BYTES", (-1,)),  # one element per output sequence
    TensorSpec("finish_reason", "BYTES", (-1,)),
    TensorSpec("cumulative_logprob", "FP32", (-1,)),
    TensorSpec("logprobs", "BYTES", (-1,)),  # JSON per output sequence
    TensorSpec("num_input_tokens", "UINT32", (1,)),
    TensorSpec("num_output_tokens", "UINT32", (-1,)),
    TensorSpec("output_ids", "INT32", (-1,)),  # Pagetron: this response's token ids, outputs concatenated
)
INPUT_NAMES = tuple(t.name for t in INPUTS)


def config_pbtxt() -> str:
    """What auto_complete_config declares, as config.pbtxt text: the launcher writes it into the
    repositories it prepares, so their tritonserver needs no auto-complete stub at each model load."""

    def entry(tensor: TensorSpec, is_input: bool) -> str:
        fields = tensor.model_config(is_input)
        text = f'{{ name: "{fields["name"]}" data_type: {fields["data_type"]} dims: {fields["dims"]}'
        return text + (f" optional: {str(fields['optional']).lower()} }}" if is_input else " }")

    inputs = ",\n  ".join(entry(t, True) for t in INPUTS)
    outputs = ",\n  ".join(entry(t, False) for t in OUTPUTS)
    return (
        f"input [\n  {inputs}\n]\noutput [\n  {outputs}\n]\nmodel_transaction_policy {{ decoupled: true }}\n"
    )


PROMPT_INPUT_NAMES = tuple(t.name for t in PROMPT_INPUTS)
BOOL_INPUT_NAMES = tuple(t.name for t in INPUTS if t.datatype == "BOOL")
INPUTS_BY_NAME = {t.name: t for t in INPUTS}
OUTPUTS_BY_NAME = {t.name: t for t in OUTPUTS}
