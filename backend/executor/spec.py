"""What the engine tells an executor about the model it is to run."""

from __future__ import annotations

from dataclasses import dataclass

from pagetron.backend.core.config import EngineConfig
from pagetron.backend.model.loader import ModelFiles
from pagetron.backend.model.model_config import ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    config: EngineConfig
    files: ModelFiles  # config, tokenizer and weights of the model path
    model_config: ModelConfig
    max_model_len: int
    eos_token_ids: frozenset[int]  # one set for the sampler (min_tokens masking) and the scheduler
