"""POST /v1/embeddings on the `embed` Triton model (sentence embeddings, L2-normalised)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from pagetron.backend.openai_api.errors import OpenAIError, bad_request
from pagetron.backend.openai_api.protocol import EmbeddingRequest
from pagetron.backend.openai_api.triton_gateway import TritonGateway
from pagetron.client.errors import TritonRequestError

MAX_INPUTS = 2048  # OpenAI's limit per request


def _inputs(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise bad_request("input", "must not be empty")
    if isinstance(value[0], int):
        return [list(value)]
    if len(value) > MAX_INPUTS:
        raise bad_request("input", f"at most {MAX_INPUTS} inputs per request, got {len(value)}")
    return list(value)


async def create_embeddings(gateway: TritonGateway, body: EmbeddingRequest) -> dict[str, Any]:
    inputs = _inputs(body.input)
    try:
        vectors, token_counts = await gateway.embed(inputs)
    except TritonRequestError as e:
        if e.code == "INVALID_ARG":  # the model names the input by its index
            raise OpenAIError(400, e.message, param="input") from None
        raise
    if body.dimensions is not None and body.dimensions != vectors.shape[1]:
        raise bad_request("dimensions", f"this model's embeddings have {vectors.shape[1]} dimensions only")
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
        for i, vector in enumerate(vectors)
    ]
    tokens = sum(token_counts)
    return {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, what the openai client decodes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()
