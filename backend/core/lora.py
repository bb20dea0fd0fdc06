"""Which LoRA adapter a request runs with (vLLM's LoRARequest). The adapter itself, a PEFT folder, is
loaded by the worker (model/lora.py); the engine only carries this through the scheduler."""

from __future__ import annotations

from dataclasses import dataclass

from pagetron.backend.core.errors import InvalidRequestError


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int  # >= 1; one id per adapter (0 is the base model)
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise InvalidRequestError(
                "lora_request", f"lora_name must be a non-empty string, got {self.lora_name!r}"
            )
        if (
            not isinstance(self.lora_int_id, int)
            or isinstance(self.lora_int_id, bool)
            or self.lora_int_id < 1
        ):
            raise InvalidRequestError(
                "lora_request", f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}"
            )
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise InvalidRequestError("lora_request", f"lora_path must be a path, got {self.lora_path!r}")
