"""SentenceEncoder (bundled all-MiniLM-L6-v2) equals sentence-transformers; bad input is refused by index."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pagetron.backend.embeddings import InvalidInputError, SentenceEncoder, default_model_dir

SENTENCE = (
    "Paged attention keeps the KV cache in fixed-size blocks, allocated on demand and freed at the end."
)
TEXTS = [
    "Hello world",
    "x",
    "The quick brown fox jumps over the lazy dog.",
    "Café déjà vu: naïve façade, Ærøskøbing, Straße",
    "日本語のテキストと中文文本",
    "Emoji 🙂🚀 and symbols ∑∫≈ ≠ ←",
    "   leading and trailing spaces   ",
    "Line one\nLine two\tafter a tab",
    " ".join([SENTENCE] * 11),  # close to the 256-token limit
    "A medium sentence about continuous batching in an inference server. " * 3,
]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder(device="cpu")


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(default_model_dir(), device="cpu")
    # modules.json ends in a Normalize module, so even normalize_embeddings=False gives unit vectors
    assert type(model[-1]).__name__ == "Normalize"
    return model.encode(TEXTS, normalize_embeddings=False, batch_size=len(TEXTS))


def test_embeddings_equal_sentence_transformers(encoder, reference):
    embeddings, _ = encoder.encode(TEXTS)  # one forward pass: short texts are padded to the long one
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    cosines = (embeddings * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    print(
        f"min cosine vs sentence-transformers: {cosines.min():.8f}, max abs diff: "
        f"{np.abs(embeddings - reference).max():.2e}"
    )
    assert cosines.min() >= 0.9999, dict(zip(TEXTS, cosines))
    assert np.abs(embeddings - reference).max() < 1e-4


def test_token_counts_include_special_tokens(encoder):
    _, counts = encoder.encode(TEXTS)
    assert counts == [len(encoder.tokenizer(t).input_ids) for t in TEXTS]
    assert counts[:2] == [4, 3]  # [CLS] hello world [SEP], [CLS] x [SEP]
    assert 240 <= counts[8] <= 256


def test_token_ids_embed_like_their_text(encoder):
    ids = [encoder.tokenizer(t).input_ids for t in TEXTS[:4]]
    from_text, text_counts = encoder.encode(TEXTS[:4])
    from_ids, id_counts = encoder.encode([ids[0], TEXTS[1], ids[2], ids[3]])
    np.testing.assert_allclose(from_ids, from_text, atol=1e-6)
    assert id_counts == text_counts


def test_the_limit_is_256_tokens_and_longer_inputs_are_refused(encoder):
    at_limit = "hello " * 254  # 254 words + [CLS] + [SEP]
    _, [count] = encoder.encode([at_limit])
    assert count == 256
    with pytest.raises(
        InvalidInputError, match=r"^input 1 has 257 tokens, more than this model's limit of 256"
    ):
        encoder.encode(["fine", at_limit + "hello"])
    with pytest.raises(InvalidInputError, match=r"^input 0 has 300 tokens"):
        encoder.encode([[101] * 300])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["fine", ""], r"^input 1 is empty$"),
        ([[]], r"^input 0 is empty$"),
        (["fine", [101, 30522, 102]], r"^input 1: token id 30522 is outside \[0, 30522\)$"),
        ([[101, -1, 102]], r"^input 0: token id -1 is outside"),
        ([[101, True, 102]], r"^input 0: expected a string or a list of int token ids$"),
        ([b"bytes"], r"^input 0: expected a string"),
    ],
)
def test_bad_inputs_are_refused_naming_their_index(encoder, inputs, message):
    with pytest.raises(InvalidInputError, match=message):
        encoder.encode(inputs)


def test_no_inputs_give_an_empty_result(encoder):
    embeddings, counts = encoder.encode([])
    assert embeddings.shape == (0, 384) and counts == []


def test_batches_sort_by_length_and_keep_the_input_order(encoder):
    small = SentenceEncoder(device="cpu", max_batch_size=4)
    inputs = [TEXTS[i] for i in (1, 8, 0, 5, 9, 2, 4, 7, 3, 6)] + [encoder.tokenizer(TEXTS[8]).input_ids]
    batches: list[list[int]] = []
    forward = small._embed
    small._embed = lambda batch: batches.append([len(ids) for ids in batch]) or forward(batch)
    embeddings, counts = small.encode(inputs)
    assert [len(b) for b in batches] == [4, 4, 3]
    lengths = [n for b in batches for n in b]
    assert lengths == sorted(lengths, reverse=True)  # longest first: little padding per pass
    one_by_one = [encoder.encode([x]) for x in inputs]
    np.testing.assert_allclose(embeddings, np.concatenate([e for e, _ in one_by_one]), atol=1e-5)
    assert counts == [c for _, [c] in one_by_one]


def test_other_pooling_modes_are_refused(tmp_path):
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    pooling = {
        "word_embedding_dimension": 384,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
    }
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(ValueError, match=r"pooling mode \['cls_token'\] is not supported, only mean pooling"):
        SentenceEncoder(str(tmp_path))
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"modules \['Transformer', 'Pooling', 'Dense'\] are not"):
        SentenceEncoder(str(tmp_path))
