"""load_model_files: a model path in, its config, tokenizer and weight stream out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelLoadError
from .gguf_cache import converted_gguf, read_manifest
from .hf_config import normalize_hf_config
from .paths import default_model_path
from .safetensors_weights import find_safetensors_files, iter_safetensors
from .tokenizer import has_tokenizer_files, load_folder_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


@dataclass
class ModelFiles:
    """What a model path holds. hf_config is normalised (see hf_config.py)."""

    hf_config: dict[str, Any]
    tokenizer: PreTrainedTokenizerBase | None
    source: str
    weight_files: list[Path] = field(default_factory=list, repr=False)
    # "safetensors" (a GGUF is served from its converted cache folder) or "dummy"
    load_format: str = "safetensors"
    # extra end-of-generation ids from generation_config.json (instruct models list end-of-turn ids there)
    generation_eos_token_ids: list[int] = field(default_factory=list)

    def weights(self, lazy: bool = False) -> Iterator[tuple[str, Any]]:
        """(HF parameter name, tensor) one at a time, in the checkpoint's dtype; no lm_head when tied. With
        ``lazy``, safetensors slices that read only the part a tensor-parallel rank indexes."""
        if self.load_format == "dummy":
            raise ModelLoadError(
                f"{self.source}: load_format 'dummy' has no weights; "
                "the model runner initialises them randomly"
            )
        return iter_safetensors(self.weight_files, self.hf_config["tie_word_embeddings"], lazy)


def _read_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no config.json, so this is not a Hugging Face model folder")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as error:
        raise ModelLoadError(f"{config_file}: not valid JSON ({error})") from error
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object")
    return normalize_hf_config(raw, str(config_file))


def _single_gguf(folder: Path) -> Path:
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if not ggufs:
        raise ModelLoadError(f"{folder}: no .gguf file in this folder")
    names = ", ".join(file.name for file in ggufs)
    raise ModelLoadError(f"{folder}: several .gguf files ({names}); pass the path of the one to load")


def _resolve(path: Path, load_format: str) -> tuple[str, Path]:
    """("hf" | "gguf", path of the folder or file to read)."""
    if path.is_file():
        if load_format == "safetensors":
            raise ModelLoadError(
                f"{path}: load_format 'safetensors' needs a Hugging Face model folder, not a file"
            )
        if path.suffix == ".gguf" or load_format == "gguf":
            return "gguf", path
        raise ModelLoadError(f"{path}: not a .gguf file; pass a .gguf file or a Hugging Face model folder")
    has_config = (path / "config.json").is_file()
    has_gguf = any(path.glob("*.gguf"))
    if load_format == "gguf":
        return "gguf", _single_gguf(path)
    if load_format == "auto" and has_gguf and not (has_config and any(path.glob("*.safetensors"))):
        return "gguf", _single_gguf(path)
    if load_format == "dummy" and has_gguf and not has_config:
        return "gguf", _single_gguf(path)
    if not has_config:
        raise ModelLoadError(
            f"{path}: no config.json (not a Hugging Face model folder) and no .gguf file to load instead"
        )
    return "hf", path


def _gguf_tokenizer(path: Path, entry: Path) -> PreTrainedTokenizerBase | None:
    status = read_manifest(entry)["tokenizer"]
    if status == "saved":
        return load_folder_tokenizer(entry)
    if status == "absent":
        return None
    raise ModelLoadError(
        f"{path}: {status.removeprefix('error: ')} (pass tokenizer= to load one from elsewhere)"
    )


def _override_tokenizer(tokenizer: str) -> PreTrainedTokenizerBase:
    path = Path(tokenizer).expanduser()
    if not path.exists():
        raise ModelLoadError(f"tokenizer path {path} does not exist")
    if path.is_dir() and has_tokenizer_files(path):
        return load_folder_tokenizer(path)
    gguf_path = path if path.is_file() else _single_gguf(path)
    found = _gguf_tokenizer(gguf_path, converted_gguf(gguf_path))
    if found is None:
        raise ModelLoadError(f"{gguf_path}: the GGUF file has no tokenizer metadata")
    return found


def load_model_files(
    model: str | None = None, load_format: str = "auto", tokenizer: str | None = None
) -> ModelFiles:
    """Read a model from a Hugging Face folder (config.json + safetensors) or a GGUF file.

    model: a folder, a .gguf file, a folder holding exactly one .gguf, or None for the default SmolLM2.
    load_format: "auto" (decided by the path), "safetensors", "gguf", or "dummy" (config and tokenizer
        only; a folder with just config.json is enough).
    tokenizer: a folder or .gguf file to take the tokenizer from instead of the model's own.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load_format {load_format!r}; choose from {', '.join(LOAD_FORMATS)}")
    path = Path(default_model_path() if model is None else model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {path} does not exist (Pagetron loads local folders and .gguf files only)"
        )
    kind, path = _resolve(path, load_format)

    if kind == "gguf":
        entry = converted_gguf(path)
        hf_config = _read_config(entry)
        weight_files = [] if load_format == "dummy" else find_safetensors_files(entry)
        own_tokenizer = None if tokenizer else _gguf_tokenizer(path, entry)
    else:
        hf_config = _read_config(path)
        weight_files = [] if load_format == "dummy" else find_safetensors_files(path)
        own_tokenizer = None if tokenizer or not has_tokenizer_files(path) else load_folder_tokenizer(path)

    return ModelFiles(
        hf_config=hf_config,
        tokenizer=_override_tokenizer(tokenizer) if tokenizer else own_tokenizer,
        source=str(path),
        weight_files=weight_files,
        load_format="dummy" if load_format == "dummy" else "safetensors",
        generation_eos_token_ids=_generation_eos_ids(path if kind != "gguf" else None),
    )


def _generation_eos_ids(folder: Path | None) -> list[int]:
    file = folder / "generation_config.json" if folder is not None else None
    if file is None or not file.is_file():
        return []
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ModelLoadError(f"{file}: not a valid generation config ({e})") from None
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ModelLoadError(f"{file}: eos_token_id must be an int or a list of ints, got {eos!r}")
    return ids
