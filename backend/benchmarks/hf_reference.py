"""HF transformers as the reference and baseline: the same weights, loaded by transformers itself."""

from __future__ import annotations

import os

import torch


def load_hf_model(model: str | None, dtype: torch.dtype = torch.float32, gguf_loader: bool = False):
    """transformers' own model for an HF folder or a .gguf file (None: the bundled default model).

    NOTE: transformers' GGUF loader parses the file's metadata twice with the pure-Python gguf reader
    (about 20 s for SmolLM2's 49k-token vocabulary). Pagetron's conversion of a GGUF equals that loader
    tensor for tensor (tests/test_loader_gguf.py), so by default transformers loads the converted folder
    (safetensors and config, in Pagetron's cache); ``gguf_loader=True`` goes through transformers' own.
    """
    from transformers import AutoModelForCausalLM

    from pagetron.backend.model.loader import default_model_path, load_model_files

    path = model or default_model_path()
    if path.endswith(".gguf") and gguf_loader:
        folder, name = os.path.split(os.path.abspath(path))
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, local_files_only=True)
    else:
        if path.endswith(".gguf"):
            path = str(load_model_files(path).weight_files[0].parent)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return hf.eval()


@torch.inference_mode()
def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, min_new_tokens: int = 0) -> list[int]:
    """Greedy continuation with HF generate() at batch 1 (no padding, so no padding effects)."""
    ids = torch.tensor([prompt_ids])
    kwargs = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        top_p=None,
        top_k=None,
        temperature=None,
        pad_token_id=hf_model.config.eos_token_id,
        **kwargs,
    )
    return out[0, len(prompt_ids) :].tolist()
