"""GGUF tensors as Hugging Face weights: renamed, dequantized to float32, Q/K rows un-permuted."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from .errors import ModelLoadError

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_LEVEL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")

# Tensors that describe the model rather than hold weights (read into the config).
CONFIG_TENSORS = ("rope_freqs.weight",)


def hf_name(gguf_name: str, path: Path) -> str:
    """model.layers.N.self_attn.q_proj.weight for blk.N.attn_q.weight, and so on."""
    if match := _LAYER_TENSOR.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    elif (match := _TOP_LEVEL_TENSOR.fullmatch(gguf_name)) and match.group(1) in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[match.group(1)]}.{match.group(2)}"
    raise ModelLoadError(f"{path}: tensor {gguf_name!r} has no counterpart in the supported models")


def unpermute_rows(values: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K permutation (per head, interleaved rotary pairs back to rotate-half order).

    The converter reshapes rows to (head, 2, head_dim / 2) and swaps the last two axes; swapping them
    back from (head, head_dim / 2, 2) restores the original rows. Works for weights and biases.
    """
    rows = values.shape[0]
    return (
        values.reshape(n_head, rows // n_head // 2, 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)
    )


def dequantized(tensor: gguf.ReaderTensor, path: Path) -> np.ndarray:
    """The tensor as float32 in HF (row-major, outermost dimension first) shape."""
    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    try:
        values = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as error:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name!r} has type {qtype.name}, which the gguf package cannot dequantize"
        ) from error
    shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))
    return np.array(values, dtype=np.float32).reshape(shape)


def iter_gguf_weights(
    reader: gguf.GGUFReader, hf_config: dict, path: Path
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every weight of the file, one tensor at a time."""
    permuted = hf_config["model_type"] in ("llama", "mistral")  # the converter permutes only for "llama"
    for tensor in reader.tensors:
        if tensor.name in CONFIG_TENSORS:
            continue
        name = hf_name(tensor.name, path)
        values = dequantized(tensor, path)
        if permuted and ".self_attn.q_proj." in name:
            values = unpermute_rows(values, hf_config["num_attention_heads"])
        elif permuted and ".self_attn.k_proj." in name:
            values = unpermute_rows(values, hf_config["num_key_value_heads"])
        yield name, torch.from_numpy(np.ascontiguousarray(values))
