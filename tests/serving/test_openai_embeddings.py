"""/v1/embeddings through the official openai client: vectors equal sentence-transformers' on the same
model (cosine >= 0.9999), in input order across Triton batches, with the right token counts."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from pagetron.backend.embeddings import default_model_dir

TEXTS = [
    "Hello world",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Café déjà vu 日本語 🙂",
    "Continuous batching replaces a finished request at once. " * 8,
]


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_model_dir()), device="cpu")


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_embeddings_equal_sentence_transformers(openai_stack, reference):
    client = openai_stack.frontend.client()
    response = client.embeddings.create(model="embed", input=TEXTS)  # the client asks for base64
    vectors = [d.embedding for d in response.data]
    assert [d.index for d in response.data] == [0, 1, 2, 3] and len(vectors[0]) == 384
    assert cosines(vectors, reference.encode(TEXTS)).min() >= 0.9999
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    tokens = sum(len(reference.tokenizer(t).input_ids) for t in TEXTS)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    floats = client.embeddings.create(model="embed", input=TEXTS[1], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, vectors[1], atol=1e-6)


def test_many_inputs_keep_their_order_and_token_ids_work(openai_stack, reference):
    client = openai_stack.frontend.client()
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'dogs'}" for i in range(150)]  # 3 batches
    response = client.embeddings.create(model="embed", input=texts)
    assert cosines([d.embedding for d in response.data], reference.encode(texts)).min() >= 0.9999
    ids = reference.tokenizer(TEXTS[0]).input_ids
    by_ids = client.embeddings.create(model="embed", input=[ids, ids[:3]])
    assert cosines([by_ids.data[0].embedding], reference.encode([TEXTS[0]])).min() >= 0.9999
    assert by_ids.usage.prompt_tokens == len(ids) + 3


def test_embedding_errors_name_the_input(openai_stack):
    frontend = openai_stack.frontend
    headers = {"authorization": f"Bearer {frontend.api_key}"}

    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{frontend.base_url}/embeddings", json=body, headers=headers, timeout=60)

    texts = ["fine"] * 70 + ["word " * 400]  # the long one is in the second Triton batch
    r = post({"model": "embed", "input": texts})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    assert r.json()["error"]["message"].startswith("input[70] has 402 tokens"), r.json()
    assert post({"model": "embed", "input": ["", "x"]}).json()["error"]["message"].startswith("input[0]")
    r = post({"model": "embed", "input": "x", "dimensions": 128})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    r = post({"model": "llm", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = post({"model": "embed", "input": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
