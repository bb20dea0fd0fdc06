"""Pagetron: paged KV cache, continuous batching, prefix caching, served from Triton Inference Server.

Layers, lowest first; each imports only from those above it in this list (tests/test_layers.py checks):
  core/        requests and scheduling: config, sampling params, sequences, block manager, scheduler,
               the step contract (SchedulerOutput -> RunnerOutput); no torch
  model/       what runs on a device: layers, Llama-family models, weight loading, sampler
  executor/    runs the model: executor, worker, model runner, step inputs, KV cache, CUDA graphs
  engine/      LLMEngine (schedule -> execute -> update -> outputs), the offline LLM, output processing
  embeddings/  the sentence encoder behind the `embed` model
  serving/     Triton: the models, the async engine, the launcher and the supervisor
  openai_api/  the OpenAI-compatible frontend (talks to Triton over gRPC; no torch)
  cli/, benchmarks/  the `pagetron` command and the benchmarks it runs

Public names are imported lazily so that light modules (sampling params, config) load without torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "InvalidRequestError": "core.errors",
    "EngineConfig": "core.config",
    "ConfigError": "core.config",
    "SamplingParams": "core.sampling_params",
    "LoRARequest": "core.lora",
    "SamplingParamsError": "core.sampling_params",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "Logprob": "engine.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pagetron.backend' has no attribute {name!r}")
    return getattr(import_module(f"pagetron.backend.{_EXPORTS[name]}"), name)
