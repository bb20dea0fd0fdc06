"""Loading GGUF files: weights as transformers dequantizes them, config from metadata, the conversion cache.

Tolerance: ours and transformers' weights are compared with torch.equal (zero tolerance). Both
dequantize with gguf.quants.dequantize into float32, and the Q/K un-permutation and the F16 -> F32
widening are exact, so any difference at all is a bug. Against the original float32 HF weights, F32,
F16 and BF16 files are exact after rounding the original to that type; quantized ones are only
checked loosely (half a quantization step of the tensor's range), which still catches swapped rows.
"""

import json
import os
import re

import gguf
import numpy as np
import pytest
import torch

from model_factory import BYTES_CHAT_TEMPLATE, hf_state_dict, make_gguf, make_hf_model
from pagetron.backend.model.loader import (
    ModelLoadError,
    default_model_path,
    gguf_cache,
    load_model_files,
    pagetron_cache_dir,
)

STORY_PROMPT = "Once upon a time, there was a little girl named"
STORY_IDS = [6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8180, 3365]
CONFIG_KEYS_FROM_METADATA = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "rope_theta",
    "rope_scaling",
    "sliding_window",
)


@pytest.fixture(autouse=True)
def isolated_cache(request, monkeypatch, tmp_path):
    """Every test gets an empty cache, except those asking for `real_cache`."""
    if "real_cache" not in request.fixturenames:
        monkeypatch.setenv("PAGETRON_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def real_cache():
    """The user's cache, so the default model is converted once per machine, not once per run."""
    return pagetron_cache_dir()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """One random HF model per GGUF architecture, with its transformers state_dict."""
    root = tmp_path_factory.mktemp("hf")
    models = {
        "llama": make_hf_model(root, "llama", num_kv_heads=2, tie_word_embeddings=False, seed=1),
        "qwen2": make_hf_model(root, "qwen2", num_kv_heads=2, tie_word_embeddings=True, seed=2),
    }
    return {arch: (folder, hf_state_dict(folder)) for arch, folder in models.items()}


def _transformers_gguf_state_dict(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    return model.state_dict()


QUANT_STEP = {"Q8_0": 1 / 127, "Q4_0": 1 / 8, "Q4_1": 1 / 15}


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weights_equal_transformers_gguf_loader(tmp_path, tiny_models, arch, tensor_type):
    folder, original = tiny_models[arch]
    path = make_gguf(tmp_path, folder, tensor_type)
    tied = arch == "qwen2"

    files = load_model_files(str(path))
    ours = dict(files.weights())
    theirs = _transformers_gguf_state_dict(path)

    assert set(ours) == set(theirs) - ({"lm_head.weight"} if tied else set())
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, theirs[name].float()), name
        if tensor_type == "F32":
            assert torch.equal(tensor, original[name]), name  # proves the Q/K un-permutation
        elif tensor_type == "F16":
            assert torch.equal(tensor, original[name].half().float()) or tensor.ndim == 1, name
        elif tensor.ndim == 2:
            step = QUANT_STEP[tensor_type] * original[name].abs().max()
            assert (tensor - original[name]).abs().max() <= step, name
    expected = load_model_files(str(folder)).hf_config
    assert {key: files.hf_config[key] for key in CONFIG_KEYS_FROM_METADATA} == {
        key: expected[key] for key in CONFIG_KEYS_FROM_METADATA
    }
    assert files.hf_config["model_type"] == arch


@pytest.mark.parametrize(
    "arch, fields",
    [
        ("llama", {"attention_bias": True}),  # Q/K biases are permuted too
        ("llama", {"num_kv_heads": 1}),
        ("mistral", {"num_kv_heads": 2}),
        ("qwen3", {"num_kv_heads": 2, "head_dim": 32, "attention_bias": True}),
        ("qwen3", {"num_kv_heads": 4, "tie_word_embeddings": True}),
    ],
)
def test_f32_and_bf16_weights_equal_original(tmp_path, arch, fields):
    fields = {"num_kv_heads": 4, "tie_word_embeddings": False, **fields}
    folder = make_hf_model(tmp_path, arch, **fields)
    original = hf_state_dict(folder)
    expected_names = set(original) - ({"lm_head.weight"} if fields["tie_word_embeddings"] else set())

    f32 = load_model_files(str(make_gguf(tmp_path, folder, "F32")))
    bf16 = dict(load_model_files(str(make_gguf(tmp_path, folder, "BF16"))).weights())
    f32_weights = dict(f32.weights())
    assert set(f32_weights) == set(bf16) == expected_names
    for name in expected_names:
        assert torch.equal(f32_weights[name], original[name]), name
        rounded = original[name] if original[name].ndim == 1 else original[name].bfloat16().float()
        assert torch.equal(bf16[name], rounded), name
    config = load_model_files(str(folder)).hf_config
    assert f32.hf_config["model_type"] == ("llama" if arch == "mistral" else arch)
    for key in ("head_dim", "attention_bias", "num_key_value_heads", "tie_word_embeddings"):
        assert f32.hf_config[key] == config[key], key


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 1024,
        },
    ],
)
def test_rope_scaling_from_metadata(tmp_path, rope_scaling):
    folder = make_hf_model(
        tmp_path,
        "llama",
        num_kv_heads=2,
        tie_word_embeddings=False,
        rope_scaling=rope_scaling,
        rope_theta=10000.0,
    )
    path = make_gguf(tmp_path, folder, "F32")
    if rope_scaling["rope_type"] == "llama3":  # llama.cpp stores llama3 scaling as a tensor, not metadata
        assert "rope_freqs.weight" in {tensor.name for tensor in gguf.GGUFReader(path).tensors}
    files = load_model_files(str(path))
    assert files.hf_config["rope_scaling"] == rope_scaling
    assert files.hf_config["rope_scaling"] == load_model_files(str(folder)).hf_config["rope_scaling"]
    assert "rope_freqs.weight" not in dict(files.weights())


def test_other_dequantizable_types_load(tmp_path, tiny_models):
    folder, original = tiny_models["llama"]
    path = make_gguf(tmp_path, folder, "Q8_0", tensor_types={"token_embd.weight": "Q5_0"})
    embedding = dict(load_model_files(str(path)).weights())["model.embed_tokens.weight"]
    assert torch.equal(embedding, _transformers_gguf_state_dict(path)["model.embed_tokens.weight"])
    reference = original["model.embed_tokens.weight"]
    assert (embedding - reference).abs().max() <= reference.abs().max() / 16  # Q5_0: 16 steps per sign


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_and_chat_template_from_metadata(tmp_path, tiny_models):
    path = make_gguf(tmp_path, tiny_models["qwen2"][0], "Q8_0", tokenizer="bytes")
    tokenizer = load_model_files(str(path)).tokenizer
    assert tokenizer.encode("hi é") == [104, 105, 32, 195, 169]
    assert tokenizer.decode([104, 105, 32, 195, 169]) == "hi é"
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "[user] hi\n"
    assert BYTES_CHAT_TEMPLATE in tokenizer.chat_template


def test_gguf_without_tokenizer(tmp_path, tiny_models):
    for arch in ("llama", "qwen2"):  # qwen2 files have no vocab_size key: it comes from token_embd
        files = load_model_files(str(make_gguf(tmp_path, tiny_models[arch][0], "F32", tokenizer=None)))
        assert files.tokenizer is None
        assert files.hf_config["vocab_size"] == 256
        assert files.hf_config["bos_token_id"] is None and files.hf_config["eos_token_id"] is None


def test_tokenizer_override(tmp_path, tiny_models):
    bare = make_gguf(tmp_path, tiny_models["llama"][0], "Q4_1", tokenizer=None)
    with_bytes = make_gguf(tmp_path, tiny_models["qwen2"][0], "Q4_1", tokenizer="bytes")
    files = load_model_files(str(bare), tokenizer=str(with_bytes))
    assert files.tokenizer.encode("ok") == [111, 107]
    assert files.hf_config["model_type"] == "llama"
    folder_of_one = load_model_files(str(bare), tokenizer=str(with_bytes.parent))
    assert folder_of_one.tokenizer.encode("ok") == [111, 107]
    with pytest.raises(ModelLoadError, match="the GGUF file has no tokenizer metadata"):
        load_model_files(str(with_bytes), tokenizer=str(bare))


def test_folder_with_one_gguf_and_dummy(tmp_path, tiny_models):
    path = make_gguf(tmp_path, tiny_models["llama"][0], "Q8_0")
    files = load_model_files(str(path.parent))
    assert files.source == str(path)
    dummy = load_model_files(str(path.parent), load_format="dummy")
    assert dummy.hf_config == files.hf_config
    assert dummy.tokenizer.encode("a") == [97]
    with pytest.raises(ModelLoadError, match="dummy.*no weights"):
        next(iter(dummy.weights()))


# ------------------------------------------------------------------------------------------------ cache


def _entries(cache_root):
    return sorted(path.name for path in (cache_root / "gguf").iterdir())


def test_conversion_is_cached_and_reused(tmp_path, tiny_models, monkeypatch):
    path = make_gguf(tmp_path, tiny_models["llama"][0], "Q4_1")
    first = dict(load_model_files(str(path)).weights())

    cache_root = pagetron_cache_dir()
    [key] = _entries(cache_root)
    entry = cache_root / "gguf" / key
    assert {"config.json", "model.safetensors", "manifest.json", "tokenizer.json"} <= {
        p.name for p in entry.iterdir()
    }
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest == {
        "source": str(path),
        "size": path.stat().st_size,
        "mtime_ns": path.stat().st_mtime_ns,
        "tokenizer": "saved",
    }

    def no_conversion(*args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(gguf_cache, "_convert", no_conversion)
    monkeypatch.setattr(gguf, "GGUFReader", no_conversion)
    again = load_model_files(str(path))
    assert [p.parent for p in again.weight_files] == [entry]
    assert again.tokenizer.encode("ab") == [97, 98]
    second = dict(again.weights())
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_touching_or_rewriting_the_file_invalidates_the_cache(tmp_path, tiny_models):
    folder, original = tiny_models["llama"]
    path = make_gguf(tmp_path, folder, "Q8_0")
    load_model_files(str(path))
    [old_key] = _entries(pagetron_cache_dir())

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_model_files(str(path))
    [touched_key] = _entries(pagetron_cache_dir())  # the stale entry was removed
    assert touched_key != old_key

    make_gguf(tmp_path, folder, "F32").replace(path)
    weights = dict(load_model_files(str(path)).weights())
    assert len(_entries(pagetron_cache_dir())) == 1
    assert torch.equal(
        weights["model.layers.1.self_attn.q_proj.weight"], original["model.layers.1.self_attn.q_proj.weight"]
    )


def test_failed_conversion_leaves_no_cache(tmp_path, tiny_models, monkeypatch):
    folder, original = tiny_models["qwen2"]
    path = make_gguf(tmp_path, folder, "Q4_0")

    def crash(weights, staging):
        (staging / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(gguf_cache, "_save_weights", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            load_model_files(str(path))
    assert list((pagetron_cache_dir() / "gguf").iterdir()) == []
    assert len(dict(load_model_files(str(path)).weights())) == len(original) - 1  # tied: no lm_head


# ------------------------------------------------------------------------------------------------ errors


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ModelLoadError, match="unsupported GGUF architecture 'gpt2'; supported: llama, qwen2, qwen3"
    ):
        load_model_files(str(path))
    assert not (pagetron_cache_dir() / "gguf").exists() or _entries(pagetron_cache_dir()) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_gguf(tmp_path, tiny_models, damage):
    path = make_gguf(tmp_path, tiny_models["llama"][0], "Q8_0")
    data = path.read_bytes()
    path.write_bytes(b"not a gguf file at all" if damage == "garbage" else data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match=re.escape(f"{path}: not a valid GGUF file")):
        load_model_files(str(path))
    assert _entries(pagetron_cache_dir()) == []


def test_tensor_type_that_cannot_be_dequantized(tmp_path, tiny_models):
    path = make_gguf(tmp_path, tiny_models["llama"][0], "F16", tensor_types={"blk.1.ffn_norm.weight": "I8"})
    with pytest.raises(
        ModelLoadError, match="tensor 'blk.1.ffn_norm.weight' has type I8, which the gguf package"
    ):
        load_model_files(str(path))


def test_tensor_no_supported_model_has(tmp_path, tiny_models):
    extra = {"blk.0.ffn_gate_inp.weight": np.zeros((4, 64), dtype=np.float32)}
    path = make_gguf(tmp_path, tiny_models["llama"][0], "F32", extra_tensors=extra)
    with pytest.raises(ModelLoadError, match="tensor 'blk.0.ffn_gate_inp.weight' has no counterpart"):
        load_model_files(str(path))


def test_folder_with_several_ggufs(tmp_path, tiny_models):
    first = make_gguf(tmp_path, tiny_models["llama"][0], "F32")
    second = make_gguf(tmp_path, tiny_models["llama"][0], "Q8_0")
    second.replace(first.parent / second.name)
    with pytest.raises(ModelLoadError, match=r"several \.gguf files \(.*F32\.gguf, .*Q8_0\.gguf\)"):
        load_model_files(str(first.parent))


# ------------------------------------------------------------------------------------------- default model


def test_default_model(real_cache):
    files = load_model_files()
    assert files.source == default_model_path()
    config = files.hf_config
    assert {key: config[key] for key in ("hidden_size", "num_hidden_layers", "num_attention_heads")} == {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
    }
    assert config["num_key_value_heads"] == 3
    assert config["head_dim"] == 64
    assert config["vocab_size"] == 49152
    assert config["intermediate_size"] == 1536
    assert config["rope_theta"] == 100000.0 and config["rope_scaling"] is None
    assert config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-5
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]

    tokenizer = files.tokenizer
    assert tokenizer.encode(STORY_PROMPT) == STORY_IDS
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )

    names = [name for name, _ in files.weights()]
    assert len(names) == 272 and "lm_head.weight" not in names
    reader = gguf.GGUFReader(default_model_path())
    k_proj = next(t for t in reader.tensors if t.name == "blk.29.attn_k.weight")
    raw = gguf.quants.dequantize(k_proj.data, k_proj.tensor_type)  # (3 heads * 64, 576), permuted rows
    weights = dict(files.weights())
    expected = raw.reshape(3, 32, 2, 576).swapaxes(1, 2).reshape(192, 576)
    assert torch.equal(weights["model.layers.29.self_attn.k_proj.weight"], torch.from_numpy(expected))
