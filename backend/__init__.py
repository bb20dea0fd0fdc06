"""Pagetron engine: paged KV cache, continuous batching, prefix caching.

Public names are imported lazily so that light modules (sampling params, config) load without torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "LLM": "llm",
    "LLMEngine": "llm_engine",
    "InvalidRequestError": "llm_engine",
    "EngineConfig": "config",
    "ConfigError": "config",
    "SamplingParams": "sampling_params",
    "SamplingParamsError": "sampling_params",
    "RequestOutput": "outputs",
    "CompletionOutput": "outputs",
    "Logprob": "outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pagetron.backend' has no attribute {name!r}")
    return getattr(import_module(f"pagetron.backend.{_EXPORTS[name]}"), name)
