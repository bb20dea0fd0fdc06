"""A Triton vLLM-backend model folder's `model.json` (vLLM engine arguments) as Pagetron engine arguments.

A repository written for Triton's vLLM backend loads after changing `backend: "vllm"` to
`backend: "pagetron"` in its config.pbtxt: keys with a Pagetron equivalent are translated, harmless ones
(logging, options of engines Pagetron does not have) are accepted and ignored, and any other key fails
the load naming it, so nothing a user configured is silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pagetron.backend.core.config import ConfigError, EngineConfig

# vLLM engine argument -> Pagetron engine argument (same meaning)
SAME_MEANING = {
    "model": "model",
    "tokenizer": "tokenizer",
    "load_format": "load_format",
    "dtype": "dtype",
    "seed": "seed",
    "block_size": "block_size",
    "max_model_len": "max_model_len",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "enable_chunked_prefill": "enable_chunked_prefill",
    "enable_prefix_caching": "enable_prefix_caching",
    "kv_cache_dtype": "kv_cache_dtype",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "enforce_eager": "enforce_eager",
    "device": "device",
    "tensor_parallel_size": "tensor_parallel_size",
    "enable_lora": "enable_lora",
    "max_loras": "max_loras",
    "max_lora_rank": "max_lora_rank",
    "max_cpu_loras": "max_cpu_loras",
}
# vLLM's other spellings of a dtype
DTYPE_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}
# accepted and ignored: logging, and knobs of machinery Pagetron does not have
IGNORED = {
    "disable_log_requests",
    "disable_log_stats",
    "max_log_len",
    "served_model_name",
    "swap_space",
    "disable_custom_all_reduce",
    "distributed_executor_backend",
    "worker_use_ray",
    "max_seq_len_to_capture",
    "trust_remote_code",  # Pagetron runs no code from a model folder, whatever this says
    "pipeline_parallel_size",  # only 1 is accepted (checked below)
}


def engine_config_from_vllm(model_json: dict[str, Any], source: str = "model.json") -> EngineConfig:
    """Raises ConfigError naming the first key Pagetron cannot honour."""
    if not isinstance(model_json, dict):
        raise ConfigError("<file>", f"{source} must hold a JSON object of vLLM engine arguments")
    args: dict[str, Any] = {}
    for key, value in model_json.items():
        if key in SAME_MEANING:
            if key == "dtype":
                value = DTYPE_ALIASES.get(value, value)
            elif key == "enable_lora":
                value = _truthy(value) or value is True
            args[SAME_MEANING[key]] = value
        elif key == "pipeline_parallel_size":
            if value != 1:
                raise ConfigError(key, f"{value} is not supported yet; only 1 (in {source})")
        elif key not in IGNORED:
            known = ", ".join(sorted(SAME_MEANING) + sorted(IGNORED))
            raise ConfigError(key, f"unknown vLLM engine argument in {source}; Pagetron knows: {known}")
    return EngineConfig.from_dict(args)


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def read_model_json(path: Path) -> EngineConfig:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("<file>", f"{path} is not valid JSON: {e}") from None
    return engine_config_from_vllm(data, str(path))
