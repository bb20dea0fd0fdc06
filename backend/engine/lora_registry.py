"""The LoRA adapters a served engine knows by name: `lora_modules` (name -> PEFT folder, also read from a
Triton model's multi_lora.json) and, on demand, the folders of `lora_dir` (vLLM's filesystem resolver).
A request names an adapter (``lora_name``); paths never come from requests."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from pagetron.backend.core.errors import InvalidRequestError
from pagetron.backend.core.lora import LoRARequest

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name under lora_dir, never a path


class LoRARegistry:
    def __init__(self, modules: Mapping[str, str] | None = None, lora_dir: str | None = None):
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self._known: dict[str, LoRARequest] = {}
        for name, path in (modules or {}).items():
            self._add(name, str(path))

    def _add(self, name: str, path: str) -> LoRARequest:
        request = LoRARequest(name, len(self._known) + 1, path)
        self._known[name] = request
        return request

    def names(self) -> list[str]:
        return list(self._known)

    def resolve(self, name: str) -> LoRARequest:
        """The adapter called ``name``; a folder of that name in lora_dir is registered on first use."""
        if name in self._known:
            return self._known[name]
        if (
            self.lora_dir is not None
            and _NAME.match(name)
            and (self.lora_dir / name / "adapter_config.json").is_file()
        ):
            return self._add(name, str(self.lora_dir / name))
        known = ", ".join(self._known) or "none"
        where = f" (nor a folder of that name in lora_dir {self.lora_dir})" if self.lora_dir else ""
        raise InvalidRequestError(
            "lora_name", f"unknown LoRA adapter {name!r}{where}; known adapters: {known}"
        )
