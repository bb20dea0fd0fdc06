"""What the engine and every worker derive from the engine arguments about the model to run: its files,
its architecture, the context length and the end-of-sequence ids. Each worker process of a multi-process
executor builds its own from the same EngineConfig (files stay in the process that loaded them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pagetron.backend.core.config import ConfigError, EngineConfig
from pagetron.backend.model.llama import kv_head_replicas
from pagetron.backend.model.loader import ModelFiles, load_model_files
from pagetron.backend.model.model_config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    config: EngineConfig
    files: ModelFiles  # config, tokenizer and weights of the model path
    model_config: ModelConfig
    max_model_len: int
    eos_token_ids: frozenset[int]  # one set for the sampler (min_tokens masking) and the scheduler

    @classmethod
    def from_config(cls, config: EngineConfig) -> ModelSpec:
        files = load_model_files(config.model, config.load_format, config.tokenizer)
        model_config = ModelConfig.from_hf_config(files.hf_config)
        _check_tensor_parallel(config.tensor_parallel_size, model_config)
        max_model_len = _max_model_len(config, model_config)
        eos = set(model_config.eos_token_ids) | set(files.generation_eos_token_ids)
        if files.tokenizer is not None and files.tokenizer.eos_token_id is not None:
            eos.add(files.tokenizer.eos_token_id)
        return cls(config, files, model_config, max_model_len, frozenset(eos))


def _max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    limit = model_config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ConfigError(
            "max_model_len", f"{config.max_model_len} exceeds the model's limit of {limit} tokens"
        )
    length = config.max_model_len or limit
    window = model_config.sliding_window
    if window is not None and length > window:
        logger.warning(
            "max_model_len capped to the sliding window (%d); sliding attention is not implemented", window
        )
        length = window
    if not config.enable_chunked_prefill and config.max_num_batched_tokens < length:
        raise ConfigError(
            "max_num_batched_tokens",
            f"{config.max_num_batched_tokens} is below max_model_len {length}; "
            "without chunked prefill a long prompt could never be scheduled",
        )
    return length


def _check_tensor_parallel(size: int, c: ModelConfig) -> None:
    """Megatron sharding needs the heads and the MLP to split evenly over the ranks."""
    problems = []
    if c.num_heads % size:
        problems.append(f"{c.num_heads} attention heads")
    if c.intermediate_size % size:
        problems.append(f"intermediate size {c.intermediate_size}")
    try:
        kv_head_replicas(c.num_kv_heads, size)
    except ValueError:
        problems.append(f"{c.num_kv_heads} KV heads (they must divide, or be divided by, the ranks)")
    if problems:
        raise ConfigError("tensor_parallel_size", f"{size} does not divide the model's {', '.join(problems)}")
