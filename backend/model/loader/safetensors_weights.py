"""Finding a folder's safetensors files and streaming their tensors one at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Buffers some checkpoints saved that are recomputed, never loaded.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def find_safetensors_files(folder: Path) -> list[Path]:
    """The files holding the weights: the shards of the index, model.safetensors, or the other *.safetensors.

    Raises ModelLoadError when there are none, when a shard is missing or a header is unreadable.
    """
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({error})") from error
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shards listed in {INDEX_FILE} are missing: {', '.join(missing)}")
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        # consolidated*.safetensors is Mistral's own layout, with names no HF model has.
        files = sorted(
            file for file in folder.glob("*.safetensors") if not file.name.startswith("consolidated")
        )
    if not files:
        extra = " (PyTorch .bin checkpoints are not supported)" if any(folder.glob("*.bin")) else ""
        raise ModelLoadError(f"{folder}: no *.safetensors weight files{extra}")
    for file in files:
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as error:
            raise ModelLoadError(f"{file}: unreadable safetensors file ({error})") from error
    return files


def iter_safetensors(
    files: list[Path], tie_word_embeddings: bool, lazy: bool = False
) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for every weight, in file order, one tensor in memory at a time; with ``lazy``,
    (name, slice) where indexing the slice reads only that part (a tensor-parallel rank's shard).

    A tied model's lm_head.weight is the embedding; a checkpoint that stores it anyway has it skipped.
    """
    for file in files:
        try:
            handle = safe_open(file, framework="pt")
        except Exception as error:
            raise ModelLoadError(f"{file}: unreadable safetensors file ({error})") from error
        with handle:
            for name in handle.keys():
                if name.endswith(_SKIPPED_SUFFIXES) or (tie_word_embeddings and name == "lm_head.weight"):
                    continue
                yield name, handle.get_slice(name) if lazy else handle.get_tensor(name)
