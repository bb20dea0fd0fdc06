"""GGUF files converted once into a Hugging Face folder under the cache, reused until the file changes.

    <pagetron_cache_dir()>/gguf/<key>/
        config.json            normalised HF config
        model.safetensors      float32 weights under HF names (or shards + model.safetensors.index.json)
        tokenizer.json, ...    the tokenizer transformers builds from the GGUF, saved with save_pretrained
        manifest.json          the source file's path, size and mtime, and what became of its tokenizer

`key` hashes the file's absolute path, size and mtime_ns (and the converter version), so touching or
rewriting the file makes a new entry. Entries are written into a temporary folder and renamed into
place: an entry that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import gguf
from safetensors.torch import save_file

from .errors import ModelLoadError
from .gguf_config import GGUFMetadata, gguf_hf_config
from .gguf_weights import dequantized, iter_gguf_weights
from .paths import pagetron_cache_dir
from .safetensors_weights import INDEX_FILE, SINGLE_FILE
from .tokenizer import convert_gguf_tokenizer

logger = logging.getLogger(__name__)

# Bump when the conversion output changes, so old entries are not reused.
CONVERTER_VERSION = 1
MANIFEST_FILE = "manifest.json"
MAX_SHARD_BYTES = 2 << 30
# Staging folders older than this were left by a crashed conversion.
ABANDONED_STAGING_SECONDS = 24 * 3600


def cache_key(path: Path) -> str:
    stat = path.stat()
    identity = json.dumps([CONVERTER_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def gguf_cache_root() -> Path:
    return pagetron_cache_dir() / "gguf"


def read_manifest(entry: Path) -> dict:
    return json.loads((entry / MANIFEST_FILE).read_text())


def converted_gguf(path: Path) -> Path:
    """The cache entry for this GGUF file, converting it first if there is none."""
    path = path.resolve()
    entry = gguf_cache_root() / cache_key(path)
    if entry.is_dir():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    logger.info("converting %s into %s (done once, then cached)", path, entry)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the entry is an ordinary cache folder
    try:
        _convert(path, staging)
        try:
            os.rename(staging, entry)
        except OSError:
            if not entry.is_dir():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_stale_entries(path, keep=entry)
    _remove_abandoned_staging(entry.parent)
    logger.info("converted %s in %.1f s", path.name, time.monotonic() - started)
    return entry


def _open_reader(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as error:
        raise ModelLoadError(f"{path}: not a valid GGUF file ({type(error).__name__}: {error})") from error


def _convert(path: Path, folder: Path) -> None:
    reader = _open_reader(path)
    meta = GGUFMetadata(reader, path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    rope_freqs = dequantized(tensors["rope_freqs.weight"], path) if "rope_freqs.weight" in tensors else None
    shapes = {
        name: tuple(int(dim) for dim in reversed(tensor.shape.tolist())) for name, tensor in tensors.items()
    }
    hf_config = gguf_hf_config(meta, shapes, rope_freqs)
    stat = path.stat()
    manifest = {"source": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    manifest["tokenizer"] = _save_tokenizer(path, meta, folder)
    _save_weights(iter_gguf_weights(reader, hf_config, path), folder)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def _save_tokenizer(path: Path, meta: GGUFMetadata, folder: Path) -> str:
    """'saved', 'absent' (no tokenizer metadata) or 'error: ...' (recorded; a tokenizer= override works)."""
    if meta.get("tokenizer.ggml.model") is None:
        return "absent"
    try:
        tokenizer = convert_gguf_tokenizer(path)
    except ModelLoadError as error:
        return f"error: {error}"
    tokenizer.save_pretrained(str(folder))
    return "saved"


def _save_weights(weights, folder: Path) -> None:
    """Write the tensors in shards of at most MAX_SHARD_BYTES, so memory stays bounded by one shard."""
    shard_files: list[str] = []
    weight_map: dict[str, str] = {}
    shard: dict = {}
    shard_bytes = 0

    def flush() -> None:
        name = f"part-{len(shard_files):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        shard_files.append(name)
        weight_map.update(dict.fromkeys(shard, name))

    for name, tensor in weights:
        if shard and shard_bytes + tensor.nbytes > MAX_SHARD_BYTES:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = tensor
        shard_bytes += tensor.nbytes
    if shard or not shard_files:
        flush()

    if len(shard_files) == 1:
        os.rename(folder / shard_files[0], folder / SINGLE_FILE)
        return
    total = len(shard_files)
    final_names = {old: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, old in enumerate(shard_files)}
    for old, new in final_names.items():
        os.rename(folder / old, folder / new)
    index = {"metadata": {}, "weight_map": {name: final_names[file] for name, file in weight_map.items()}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _remove_stale_entries(path: Path, keep: Path) -> None:
    """Entries converted from an earlier version of the same file can never be hit again."""
    for entry in keep.parent.iterdir():
        if entry == keep or entry.name.startswith(".") or not (entry / MANIFEST_FILE).is_file():
            continue
        try:
            stale = read_manifest(entry).get("source") == str(path)
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def _remove_abandoned_staging(root: Path) -> None:
    cutoff = time.time() - ABANDONED_STAGING_SECONDS
    for staging in root.glob(".tmp-*"):
        try:
            if staging.stat().st_mtime < cutoff:
                shutil.rmtree(staging, ignore_errors=True)
        except OSError:
            continue
