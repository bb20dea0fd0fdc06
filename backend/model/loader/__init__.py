"""Model and tokenizer loading: Hugging Face safetensors folders and GGUF files (converted once, cached)."""

from .errors import ModelLoadError
from .hf_config import SUPPORTED_MODEL_TYPES, normalize_hf_config
from .model_files import LOAD_FORMATS, ModelFiles, load_model_files
from .paths import default_model_path, pagetron_cache_dir

__all__ = [
    "LOAD_FORMATS",
    "SUPPORTED_MODEL_TYPES",
    "ModelFiles",
    "ModelLoadError",
    "default_model_path",
    "load_model_files",
    "normalize_hf_config",
    "pagetron_cache_dir",
]
