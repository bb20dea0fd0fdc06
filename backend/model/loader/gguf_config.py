"""A config.json dict rebuilt from a GGUF file's metadata, as llama.cpp's converter wrote it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .errors import ModelLoadError
from .hf_config import ARCHITECTURES, normalize_hf_config

# GGUF architecture -> HF model_type. llama.cpp writes Mistral models as "llama".
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# GGUF rope.scaling.* keys -> HF rope_scaling keys.
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "yarn_attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}


def _as_python(value: Any) -> Any:
    """Metadata floats are float32: give them their shortest decimal (1e-05, not 9.999999747e-06)."""
    if isinstance(value, float):
        return float(str(np.float32(value)))
    return value


class GGUFMetadata:
    """Typed access to the key/value metadata of an open gguf.GGUFReader."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.reader = reader
        self.path = path
        self.arch = self.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else _as_python(field.contents())

    def arch_value(self, name: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{name}", default)

    def require(self, name: str) -> Any:
        value = self.arch_value(name)
        if value is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks {self.arch}.{name}")
        return value

    def array_length(self, key: str) -> int | None:
        field = self.reader.fields.get(key)
        return None if field is None else len(field.data)


def _single(value: Any, what: str, path: Path) -> Any:
    """Some files store per-layer lists; these models need one value for all layers."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ModelLoadError(f"{path}: per-layer {what} {value} differ, which is not supported")
        return value[0]
    return value


def _rope_scaling(meta: GGUFMetadata) -> dict[str, Any] | None:
    scaling_type = meta.arch_value("rope.scaling.type")
    if scaling_type in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": scaling_type}
    for gguf_key, hf_key in _ROPE_SCALING_KEYS.items():
        value = meta.arch_value(f"rope.scaling.{gguf_key}")
        if value is not None:
            scaling[hf_key] = value
    return scaling


def llama3_scaling_from_rope_freqs(
    divisors: np.ndarray, theta: float, head_dim: int, path: Path
) -> dict | None:
    """Recover llama3 rope_scaling from the per-frequency divisors llama.cpp stores as rope_freqs.weight.

    Divisors are 1 for short wavelengths, `factor` for long ones, and 1 / ((1 - s) / factor + s) in
    between, where s = (original_context / wavelength - low) / (high - low). s is linear in
    1 / wavelength; two in-between points fix the line, and low_freq_factor = 1 (every Llama 3
    release) then fixes high_freq_factor and original_max_position_embeddings.
    """
    divisors = divisors.astype(np.float64)
    factor = float(divisors.max())
    if math.isclose(factor, 1.0):
        return None
    wavelengths = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    between = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if between.sum() < 2:
        raise ModelLoadError(
            f"{path}: rope_freqs.weight has too few interpolated frequencies to recover llama3 rope"
        )
    smooth = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelengths[between], smooth, 1)
    high = round(1 - 1 / intercept, 3)
    original = round(-slope / intercept)
    scaling = {
        "rope_type": "llama3",
        "factor": float(str(np.float32(factor))),
        "low_freq_factor": 1.0,
        "high_freq_factor": float(high),
        "original_max_position_embeddings": int(original),
    }
    if not np.allclose(_llama3_divisors(wavelengths, factor, high, original), divisors, rtol=1e-4):
        raise ModelLoadError(f"{path}: rope_freqs.weight does not follow llama3 rope scaling")
    return scaling


def _llama3_divisors(wavelengths: np.ndarray, factor: float, high: float, original: float) -> np.ndarray:
    smooth = (original / wavelengths - 1.0) / (high - 1.0)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelengths < original / high, 1.0, np.where(wavelengths > original, factor, between))


def gguf_hf_config(
    meta: GGUFMetadata, tensor_shapes: dict[str, tuple[int, ...]], rope_freqs: np.ndarray | None
) -> dict[str, Any]:
    """The normalised HF config dict for a GGUF file (see hf_config.normalize_hf_config).

    tensor_shapes: GGUF tensor name -> HF-order shape; tells tied embeddings, biases and, failing
    metadata, the vocabulary size.
    """
    arch = meta.arch
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{meta.path}: unsupported GGUF architecture {arch!r}; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    model_type = SUPPORTED_GGUF_ARCHITECTURES[arch]
    heads = _single(meta.require("attention.head_count"), "head counts", meta.path)
    hidden = meta.require("embedding_length")
    head_dim = (
        meta.arch_value("attention.key_length") or meta.arch_value("rope.dimension_count") or hidden // heads
    )
    vocab_size = meta.arch_value("vocab_size") or meta.array_length("tokenizer.ggml.tokens")
    if vocab_size is None and "token_embd.weight" in tensor_shapes:
        vocab_size = tensor_shapes["token_embd.weight"][0]
    theta = meta.arch_value("rope.freq_base", 10000.0)
    rope_scaling = _rope_scaling(meta)
    if rope_freqs is not None:
        rope_scaling = llama3_scaling_from_rope_freqs(rope_freqs, theta, head_dim, meta.path)
    sliding_window = meta.arch_value("attention.sliding_window")

    raw = {
        "model_type": model_type,
        "architectures": [ARCHITECTURES[model_type]],
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _single(meta.require("feed_forward_length"), "feed-forward sizes", meta.path),
        "num_hidden_layers": meta.require("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _single(
            meta.arch_value("attention.head_count_kv", heads), "KV heads", meta.path
        ),
        "head_dim": head_dim,
        "rms_norm_eps": meta.arch_value("attention.layer_norm_rms_epsilon", 1e-6),
        "max_position_embeddings": meta.require("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in tensor_shapes,
        "rope_theta": theta,
        "rope_scaling": rope_scaling,
    }
    if sliding_window is not None:
        raw.update(use_sliding_window=True, sliding_window=sliding_window)
    return normalize_hf_config(raw, str(meta.path))
