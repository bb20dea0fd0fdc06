"""Tokenizers through transformers, from a Hugging Face folder or from GGUF metadata, never from a hub."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Any one of these means the folder carries its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_folder_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer from a local folder (chat template from tokenizer_config.json or chat_template.jinja)."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(folder):
        raise ModelLoadError(f"{folder}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:
        raise ModelLoadError(f"{folder}: cannot load the tokenizer: {error}") from error


def convert_gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer (and chat template) transformers builds from a GGUF file's tokenizer.* metadata."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    except Exception as error:
        raise ModelLoadError(
            f"{gguf_path}: cannot build a tokenizer from the GGUF metadata: {error}"
        ) from error
