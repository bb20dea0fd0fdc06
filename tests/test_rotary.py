"""Rope frequencies (with each supported scaling) equal transformers' own computation."""

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagetron.backend.model.layers.rotary import rope_inv_freq

SCALINGS = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 2.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
    {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 16,
        "beta_slow": 2,
    },
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=[s["rope_type"] for s in SCALINGS])
def test_inv_freq_and_attention_factor_match_transformers(scaling):
    config = transformers.LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        rope_scaling=dict(scaling),
        max_position_embeddings=512,
        rope_theta=50000.0,
    )
    params = dict(config.rope_parameters)
    if scaling["rope_type"] == "default":  # transformers 5 has no init function for plain rope
        expected, factor = 1.0 / (50000.0 ** (torch.arange(0, 32, 2, dtype=torch.int64).float() / 32)), 1.0
    else:
        expected, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    ours, our_factor = rope_inv_freq(
        32, params["rope_theta"], None if scaling["rope_type"] == "default" else params
    )
    assert torch.equal(ours, expected.float())
    assert our_factor == pytest.approx(factor, rel=1e-12)


def test_unsupported_scaling_is_a_clear_error():
    with pytest.raises(ValueError, match="dynamic"):
        rope_inv_freq(32, 10000.0, {"rope_type": "dynamic", "factor": 2.0})


def test_scaled_rope_without_original_length_falls_back_like_transformers():
    from pagetron.backend.model.loader.errors import ModelLoadError
    from pagetron.backend.model.loader.hf_config import normalize_rope

    theta, scaling = normalize_rope(
        {"max_position_embeddings": 2048, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    )
    assert scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    with pytest.raises(ModelLoadError, match="low_freq_factor"):
        normalize_rope(
            {"max_position_embeddings": 2048, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
        )
