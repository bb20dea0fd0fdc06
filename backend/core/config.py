"""Engine arguments, validated strictly: an unknown key or a bad value raises ConfigError naming it."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pagetron.backend.core.fields import field_types

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICES = ("auto", "cpu", "cuda")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_ATTENTION_BACKENDS = ("auto", "torch", "triton")
QUANTIZATIONS = (None, "fp8")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # auto: the model dtype; fp8: float8 e4m3, scales 1.0


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(f"engine argument {key!r}: {message}")
        self.key = key


@dataclass
class EngineConfig:
    model: str | None = None  # HF folder, .gguf file, or None for the bundled SmolLM2-135M-Instruct
    tokenizer: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    seed: int = 0
    block_size: int = 16
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    # admit a request only if the free KV blocks cover the expected growth of all running ones (scheduler)
    reserve_kv_for_growth: bool = True
    kv_cache_dtype: str = "auto"
    # "fp8": linear weights in float8 e4m3 (per output channel scales), activations quantized per token;
    # a checkpoint already in FP8 is used as stored whatever this says
    quantization: str | None = None
    num_kv_blocks: int | None = None  # fixes the KV pool size (tests use it to force preemption)
    kv_cache_memory_gb: float = 2.0  # CPU KV pool size when num_kv_blocks is not given
    gpu_memory_utilization: float = 0.90
    enforce_eager: bool = False
    # LoRA adapters (PEFT folders) per request: device slots, the largest rank, adapters kept on the host
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras
    lora_modules: dict | None = None  # adapters requests may name (lora_name): {name: PEFT folder}
    lora_dir: str | None = None  # a folder of adapter folders, each loaded when a request first names it
    # schedule step N+1 while step N runs on the device; its tokens feed N+1 there (single-process only;
    # tensor-parallel engines step synchronously). None: on where the device runs apart from the host (a
    # GPU), off on the CPU, where the forward pass runs on the host and there is nothing to overlap
    async_scheduling: bool | None = None
    attention_backend: str = "auto"  # auto: OpenAI-Triton kernels on CUDA, torch references on CPU
    # tensor parallelism: ranks (one process and, on CUDA, one GPU each), spread over nnodes hosts; the
    # other hosts run `pagetron worker` and meet the engine at dist_init_addr ("host:port")
    tensor_parallel_size: int = 1
    nnodes: int = 1
    dist_init_addr: str | None = None
    # a constrained request whose grammar takes longer than this to compile is refused
    grammar_compile_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        self._check_types()
        if self.load_format not in _LOAD_FORMATS:
            raise ConfigError("load_format", f"must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError("dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise ConfigError(
                "attention_backend", f"must be one of {_ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                "kv_cache_dtype", f"must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        _positive(self, "max_loras", "max_lora_rank")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(
                "max_cpu_loras", f"must be >= max_loras {self.max_loras}, got {self.max_cpu_loras}"
            )
        if (self.lora_modules or self.lora_dir) and not self.enable_lora:
            key = "lora_modules" if self.lora_modules else "lora_dir"
            raise ConfigError(key, "adapters need enable_lora=True")
        if self.lora_modules is not None and not all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.lora_modules.items()
        ):
            raise ConfigError(
                "lora_modules", f"must map adapter names to PEFT folders, got {self.lora_modules!r}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError("quantization", f"must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.device not in _DEVICES:
            raise ConfigError("device", f"must be one of {_DEVICES}, got {self.device!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError("block_size", f"must be a power of two >= 1, got {self.block_size}")
        _positive(self, "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size", "nnodes")
        if self.tensor_parallel_size % self.nnodes:
            raise ConfigError(
                "nnodes", f"{self.nnodes} hosts cannot share {self.tensor_parallel_size} ranks evenly"
            )
        if self.nnodes > 1 and not _host_port(self.rendezvous_address()):
            raise ConfigError(
                "dist_init_addr",
                "with nnodes > 1, the engine's address as host:port or tcp://host:port (or MASTER_ADDR and "
                f"MASTER_PORT in the environment); got {self.dist_init_addr!r}",
            )
        if self.max_model_len is not None:
            _positive(self, "max_model_len")
        if self.num_kv_blocks is not None:
            _positive(self, "num_kv_blocks")
        if not 0 < self.kv_cache_memory_gb < 1 << 20:
            raise ConfigError("kv_cache_memory_gb", f"must be in (0, 2**20), got {self.kv_cache_memory_gb}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                "max_num_batched_tokens",
                f"{self.max_num_batched_tokens} is below max_num_seqs {self.max_num_seqs}: "
                "a decode step could not give every running sequence its token",
            )
        if not self.grammar_compile_timeout_s > 0:
            raise ConfigError(
                "grammar_compile_timeout_s", f"must be > 0 seconds, got {self.grammar_compile_timeout_s}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                "gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    def _check_types(self) -> None:
        for name, ftype in field_types(EngineConfig).items():
            value, expected = getattr(self, name), ftype.base
            if value is None and ftype.optional:
                continue
            ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))
                ok = True
            if not ok:
                raise ConfigError(name, f"expected {expected.__name__}, got {type(value).__name__} {value!r}")

    def rendezvous_address(self) -> str | None:
        """host:port where the ranks of several hosts meet: dist_init_addr (SGLang's spelling, or a tcp://
        init method), else torch.distributed's MASTER_ADDR and MASTER_PORT."""
        if self.dist_init_addr:
            return self.dist_init_addr.removeprefix("tcp://")
        if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            return f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        return None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise ConfigError(key, f"unknown engine argument; valid ones: {', '.join(names)}")
        return cls(**d)

    @classmethod
    def from_json_file(cls, path: str) -> EngineConfig:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError("<file>", f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("<file>", f"{path} must hold a JSON object")
        return cls.from_dict(data)


def _host_port(addr: str | None) -> bool:
    host, _, port = (addr or "").rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _positive(cfg: EngineConfig, *keys: str) -> None:
    for key in keys:
        if getattr(cfg, key) < 1:
            raise ConfigError(key, f"must be >= 1, got {getattr(cfg, key)}")
