"""Sentence embeddings as a (not decoupled) Triton Python-backend model (model_repository/embed/1/model.py).

Triton's dynamic batcher hands execute() several requests at once; all their valid inputs go through one
SentenceEncoder.encode call, and a request with bad input gets its own INVALID_ARG error while the others
in the same call are answered normally.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from pagetron.backend.embeddings import InvalidInputError, SentenceEncoder
from pagetron.backend.serving.constants import tag_error

WARMUP_TEXT = "Pagetron warms up its sentence encoder."


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        if pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("model 'embed' must not be decoupled")
        self.encoder = SentenceEncoder(max_batch_size=max(1, model_config.get("max_batch_size", 0)))
        [dim] = pb_utils.get_output_config_by_name(model_config, "embedding")["dims"]
        if dim != self.encoder.dim:
            raise pb_utils.TritonModelException(
                f"config.pbtxt declares embedding dims [{dim}], the model makes {self.encoder.dim}"
            )
        embeddings, _ = self.encoder.encode([WARMUP_TEXT])  # READY means an embedding came out
        if embeddings.shape != (1, dim) or not np.isfinite(embeddings).all():
            raise pb_utils.TritonModelException(f"warm-up embedding is wrong: shape {embeddings.shape}")
        import torch

        pb_utils.Logger.log_info(
            f"pagetron embed: warm-up encoded; ready ({self.encoder.device}, {torch.get_num_threads()} "
            f"torch threads, dim {dim}, max_seq_length {self.encoder.max_seq_length})"
        )

    def execute(self, requests: list) -> list:
        token_ids: list[list[list[int]] | None] = []
        errors: dict[int, pb_utils.TritonError] = {}
        for i, request in enumerate(requests):
            try:
                token_ids.append(self.encoder.tokenize(_request_inputs(request)))
            except InvalidInputError as e:
                token_ids.append(None)
                errors[i] = _error(str(e), "INVALID_ARG")
        flat = [ids for ids_list in token_ids if ids_list for ids in ids_list]
        try:
            embeddings = self.encoder.embed_ids(flat)  # tokenized and checked above
        except Exception as e:  # every request of this call fails alike; the model stays up
            error = _error(f"embedding failed: {e}", "INTERNAL")
            return [pb_utils.InferenceResponse(error=errors.get(i, error)) for i in range(len(requests))]
        responses, row = [], 0
        for i, ids_list in enumerate(token_ids):
            if ids_list is None:
                responses.append(pb_utils.InferenceResponse(error=errors[i]))
                continue
            rows = slice(row, row + len(ids_list))
            row += len(ids_list)
            tensors = [
                pb_utils.Tensor("embedding", embeddings[rows]),
                pb_utils.Tensor(
                    "num_tokens", np.array([len(ids) for ids in ids_list], dtype=np.uint32).reshape(-1, 1)
                ),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        del self.encoder


def _error(message: str, code: str) -> pb_utils.TritonError:
    return pb_utils.TritonError(tag_error(message, code), getattr(pb_utils.TritonError, code))


def _request_inputs(request) -> list[str | list[int]]:
    """The request's texts ([B, 1] BYTES) or token-id rows ([B, L] INT32): exactly one of the two."""
    text = pb_utils.get_input_tensor_by_name(request, "text_input")
    ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
    if (text is None) == (ids is None):
        raise InvalidInputError("give exactly one of text_input or input_ids")
    if ids is not None:
        rows = ids.as_numpy()
        return [row.tolist() for row in rows.reshape(len(rows), -1)]
    texts = []
    for i, raw in enumerate(text.as_numpy().reshape(-1)):
        try:
            texts.append(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
        except UnicodeDecodeError:
            raise InvalidInputError(f"input {i}: text_input is not valid UTF-8") from None
    return texts


__all__ = ["TritonPythonModel"]
