"""Pagetron engine: paged KV cache, continuous batching, prefix caching."""

from pagetron.backend.config import ConfigError, EngineConfig
from pagetron.backend.llm import LLM
from pagetron.backend.llm_engine import InvalidRequestError, LLMEngine
from pagetron.backend.outputs import CompletionOutput, Logprob, RequestOutput
from pagetron.backend.sampling_params import SamplingParams, SamplingParamsError

__all__ = [
    "LLM",
    "CompletionOutput",
    "ConfigError",
    "EngineConfig",
    "InvalidRequestError",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "SamplingParamsError",
]
