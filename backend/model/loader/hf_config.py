"""One config.json layout for every supported checkpoint, whatever transformers version wrote it.

transformers 5 writes rope settings as `rope_parameters` ({"rope_theta", "rope_type", ...}); older
versions write `rope_theta` plus `rope_scaling` ({"type" or "rope_type", "factor", ...}). Both become
`rope_theta` (float) and `rope_scaling` (None for plain rope, else {"rope_type": ..., params}).
Fields a config may omit get the value the transformers config class would give them.
"""

from __future__ import annotations

from typing import Any

from .errors import ModelLoadError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)

REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

# transformers' defaults for fields a config.json may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen2": {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "bos_token_id": None,
        "eos_token_id": None,
    },
    "qwen3": {
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "bos_token_id": None,
        "eos_token_id": None,
    },
}
_DEFAULT_ROPE_THETA = 10000.0
_MISTRAL_DEFAULT_SLIDING_WINDOW = 4096


def normalize_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config layout."""
    if isinstance(config.get("rope_parameters"), dict):
        params = dict(config["rope_parameters"])
    else:
        params = dict(config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", config.get("rope_theta", _DEFAULT_ROPE_THETA))
    rope_type = params.pop("rope_type", None)
    legacy_type = params.pop("type", None)
    rope_type = rope_type or legacy_type or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type in ("llama3", "yarn"):
        # transformers falls back to these when a config leaves them out
        params.setdefault(
            "original_max_position_embeddings",
            config.get("original_max_position_embeddings") or config.get("max_position_embeddings"),
        )
        if (
            params.get("factor") is None
            and rope_type == "yarn"
            and params["original_max_position_embeddings"]
        ):
            params["factor"] = config["max_position_embeddings"] / params["original_max_position_embeddings"]
    required = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
        "yarn": ("factor",),
    }.get(rope_type, ())
    missing = [key for key in required if params.get(key) is None]
    if missing:
        raise ModelLoadError(f"rope scaling {rope_type!r} needs {', '.join(missing)} in the config")
    return float(theta), {"rope_type": rope_type, **params}


def _sliding_window(model_type: str, config: dict[str, Any]) -> int | None:
    if model_type == "mistral":
        return config.get("sliding_window", _MISTRAL_DEFAULT_SLIDING_WINDOW)
    if model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        return config.get("sliding_window")
    return None


def normalize_hf_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The normalised copy of a config.json dict; `source` names the file in error messages."""
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ModelLoadError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    missing = [field for field in REQUIRED_FIELDS if raw.get(field) is None]
    if missing:
        raise ModelLoadError(f"{source}: config is missing {', '.join(missing)}")

    config = dict(_DEFAULTS[model_type])
    config.update({key: value for key, value in raw.items() if key != "rope_parameters"})
    config["architectures"] = raw.get("architectures") or [ARCHITECTURES[model_type]]
    heads = config["num_attention_heads"]
    config["num_key_value_heads"] = config.get("num_key_value_heads") or heads
    if not config.get("head_dim"):
        if config["hidden_size"] % heads:
            raise ModelLoadError(
                f"{source}: hidden_size {config['hidden_size']} is not divisible by {heads} heads"
            )
        config["head_dim"] = config["hidden_size"] // heads
    if heads % config["num_key_value_heads"]:
        raise ModelLoadError(
            f"{source}: {heads} attention heads are not a multiple of "
            f"{config['num_key_value_heads']} KV heads"
        )
    config["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings", False))
    # Qwen2 always has q/k/v biases although its config has no key saying so.
    config["attention_bias"] = True if model_type == "qwen2" else bool(raw.get("attention_bias", False))
    config["rope_theta"], config["rope_scaling"] = normalize_rope(raw)
    config["sliding_window"] = _sliding_window(model_type, raw)
    return config
