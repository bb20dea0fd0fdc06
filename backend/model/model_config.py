"""The architecture facts the engine needs, read from a normalised HF config dict."""

from __future__ import annotations

from dataclasses import dataclass

from pagetron.backend.model.quantization import checkpoint_fp8_scheme


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    quantization: str | None = None  # "fp8": the checkpoint's linear weights are stored in FP8

    @classmethod
    def from_hf_config(cls, c: dict) -> ModelConfig:
        """From a config normalised by loader.normalize_hf_config (every key present)."""
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only silu)")
        eos = c["eos_token_id"]
        return cls(
            model_type=c["model_type"],
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            num_kv_heads=c["num_key_value_heads"],
            head_dim=c["head_dim"],
            rms_norm_eps=c["rms_norm_eps"],
            rope_theta=c["rope_theta"],
            rope_scaling=c["rope_scaling"],
            max_position_embeddings=c["max_position_embeddings"],
            tie_word_embeddings=c["tie_word_embeddings"],
            attention_bias=c["attention_bias"],
            qk_norm=c["model_type"] == "qwen3",
            sliding_window=c["sliding_window"],
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            quantization=checkpoint_fp8_scheme(c.get("quantization_config")),
        )
