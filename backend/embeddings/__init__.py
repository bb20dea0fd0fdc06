"""Sentence embeddings (the `embed` Triton model's encoder)."""

from .sentence_encoder import InvalidInputError, SentenceEncoder, default_model_dir

__all__ = ["InvalidInputError", "SentenceEncoder", "default_model_dir"]
