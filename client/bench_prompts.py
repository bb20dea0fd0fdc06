"""Deterministic benchmark prompts of a given length: random token ids, or text of about that many tokens."""

from __future__ import annotations

import numpy as np

# Short, frequent English words: nearly every one is a single token (with its leading space) in the
# Llama, Llama-3 and SmolLM2 tokenizers, so N words make a prompt of about N tokens.
WORDS = (
    "the of and to in is that it for was on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know"
).split()

# Ids below this are kept out of token-id prompts: tokenizers put their special tokens (BOS, EOS, pad,
# chat markers) first in the vocabulary.
MIN_TOKEN_ID = 100


def prompt_rng(seed: int, level: int, index: int) -> np.random.Generator:
    """One generator per (run seed, concurrency level, request index): prompts never repeat across levels,
    so a server's prefix cache cannot make a later level look faster."""
    return np.random.default_rng([seed, level, index])


def token_id_prompt(rng: np.random.Generator, length: int, vocab_size: int) -> list[int]:
    if vocab_size <= MIN_TOKEN_ID:
        raise ValueError(f"vocab_size must be above {MIN_TOKEN_ID}, got {vocab_size}")
    return [int(t) for t in rng.integers(MIN_TOKEN_ID, vocab_size, size=length)]


def text_prompt(rng: np.random.Generator, length: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=length))
