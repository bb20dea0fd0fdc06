"""Where and in what precision the model runs, and which kernels it uses: decided once per worker."""

from __future__ import annotations

import torch

from pagetron.backend.core.config import EngineConfig
from pagetron.kernels.attention_ref import FP8_DTYPE

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of one rank: on CUDA, GPU number ``local_rank`` of its host."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine argument 'device': 'cuda' requested but no CUDA device is available")
    if name == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"rank {local_rank} of this host needs a GPU; it has {torch.cuda.device_count()}"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_kernels(name: str, device: torch.device) -> str:
    """The kernel set ("torch" references or "triton" kernels) for engine argument attention_backend."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda":
        raise ValueError("engine argument 'attention_backend': the Triton kernels need a CUDA device")
    return name


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def resolve_kv_cache_dtype(config: EngineConfig, dtype: torch.dtype) -> torch.dtype:
    return FP8_DTYPE if config.kv_cache_dtype.startswith("fp8") else dtype
