"""Per-request sampling parameters, validated with the same ranges as vLLM.

``from_dict`` / ``from_json`` are the strict entry points for untrusted input (the Triton request's
``sampling_parameters`` JSON): unknown keys are rejected and numbers may arrive as strings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pagetron.backend.core.fields import field_types
from pagetron.backend.core.structured_outputs import StructuredOutputsError, StructuredOutputsParams

MAX_N = 64
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # |bias| bound, as OpenAI's API sets it
MAX_SEED = 2**63 - 1  # seeds must be >= 0; Sequence seeds its generator with seed + index
_GREEDY_EPS = 1e-5


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; ``field`` is the offending key."""

    def __init__(self, field: str, message: str):
        super().__init__(f"invalid sampling parameter {field!r}: {message}")
        self.field = field


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: until max_model_len
    min_tokens: int = 0
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per output token; 0: only the sampled token
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    lora_name: str | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    # constrained decoding: JSON schema, regex, choice or grammar (older key: guided_decoding)
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # the field sets are read from the annotations (below)
            value = getattr(self, f.name)
            if value is None:
                if f.name not in _OPTIONAL_FIELDS:
                    raise SamplingParamsError(f.name, "must not be null")
            elif f.name in _INT_FIELDS:
                _check_int(f.name, value)
            elif f.name in _FLOAT_FIELDS:
                setattr(self, f.name, _check_float(f.name, value))
            elif f.name in _BOOL_FIELDS and not isinstance(value, bool):
                raise SamplingParamsError(f.name, f"must be a boolean, got {type(value).__name__}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._check_ranges()
        self._check_lists()
        if self.structured_outputs is not None:
            self.structured_outputs = _structured(self.structured_outputs)

    def _check_ranges(self) -> None:
        _require("n", 1 <= self.n <= MAX_N, f"must be in [1, {MAX_N}], got {self.n}")
        _require("temperature", self.temperature >= 0, f"must be >= 0, got {self.temperature}")
        _require("top_p", 0 < self.top_p <= 1, f"must be in (0, 1], got {self.top_p}")
        _require("top_k", self.top_k >= -1, f"must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        _require("min_p", 0 <= self.min_p <= 1, f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            _require("seed", 0 <= self.seed <= MAX_SEED, f"must be in [0, 2**63 - 1], got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(name, -2 <= value <= 2, f"must be in [-2, 2], got {value}")
        _require(
            "repetition_penalty", self.repetition_penalty > 0, f"must be > 0, got {self.repetition_penalty}"
        )
        if self.max_tokens is not None:
            _require("max_tokens", self.max_tokens >= 1, f"must be >= 1 or null, got {self.max_tokens}")
        _require("min_tokens", self.min_tokens >= 0, f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None:
            _require(
                "min_tokens",
                self.min_tokens <= self.max_tokens,
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )
        if self.logprobs is not None:
            _require(
                "logprobs",
                0 <= self.logprobs <= MAX_LOGPROBS,
                f"must be in [0, {MAX_LOGPROBS}] or null, got {self.logprobs}",
            )
        _require(
            "lora_name",
            self.lora_name is None or (isinstance(self.lora_name, str) and self.lora_name.strip() != ""),
            "must be an adapter's name or null",
        )

    def _check_lists(self) -> None:
        if self.stop is not None:
            if not isinstance(self.stop, (list, tuple)):
                raise SamplingParamsError("stop", "must be a string or a list of non-empty strings")
            self.stop = list(self.stop)
            for s in self.stop:
                ok = isinstance(s, str) and s != ""
                _require("stop", ok, f"entries must be non-empty strings, got {s!r}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise SamplingParamsError("stop_token_ids", "must be a list of token ids >= 0")
            self.stop_token_ids = list(self.stop_token_ids)
            for t in self.stop_token_ids:
                _check_int("stop_token_ids", t)
                _require("stop_token_ids", t >= 0, f"entries must be >= 0, got {t}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise SamplingParamsError("logit_bias", "must be an object of token id -> bias")
            bias = {}
            for token, value in self.logit_bias.items():
                _check_int("logit_bias", token)
                _require("logit_bias", token >= 0, f"token ids must be >= 0, got {token}")
                value = _check_float("logit_bias", value)
                _require(
                    "logit_bias",
                    abs(value) <= MAX_LOGIT_BIAS,
                    f"biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {value} for {token}",
                )
                bias[token] = value
            self.logit_bias = bias

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def uses_output_history(self) -> bool:
        """Sampling reads the tokens generated so far (penalties), so it cannot run ahead of them."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        if not isinstance(d, Mapping):
            raise SamplingParamsError("<root>", f"must be an object, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, Any] = {}
        if "guided_decoding" in d:  # Triton's vLLM backend's older name for structured_outputs
            if "structured_outputs" in d:
                raise SamplingParamsError("guided_decoding", "give structured_outputs or it, not both")
            d = {("structured_outputs" if k == "guided_decoding" else k): v for k, v in d.items()}
        for key, value in d.items():
            if key not in valid:
                raise SamplingParamsError(str(key), f"unknown key; valid keys are {', '.join(valid)}")
            kwargs[key] = _coerce(key, value)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> SamplingParams:
        try:
            data = json.loads(text)
        except (ValueError, TypeError) as e:
            raise SamplingParamsError("<root>", f"not valid JSON: {e}") from None
        return cls.from_dict(data)


_TYPES = field_types(SamplingParams)
_INT_FIELDS = {name for name, t in _TYPES.items() if t.base is int}
_FLOAT_FIELDS = {name for name, t in _TYPES.items() if t.base is float}
_BOOL_FIELDS = {name for name, t in _TYPES.items() if t.base is bool}
_OPTIONAL_FIELDS = {name for name, t in _TYPES.items() if t.optional}


def _structured(value: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams.from_dict(value)
    except StructuredOutputsError as e:
        raise SamplingParamsError(e.field, e.message) from None


def _require(field: str, ok: bool, message: str) -> None:
    if not ok:
        raise SamplingParamsError(field, message)


def _check_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(field, f"must be an integer, got {type(value).__name__} {value!r}")


def _check_float(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(field, f"must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise SamplingParamsError(field, f"must be finite, got {value}")
    return float(value)


def _coerce(key: str, value: Any) -> Any:
    """Turn JSON-ish input (numbers as strings, "true"/"false") into the field's type; leave the rest to
    ``__post_init__``, which rejects anything still of the wrong type."""
    if value is None:
        return None
    if key in _BOOL_FIELDS and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        raise SamplingParamsError(key, f"must be true or false, got {value!r}")
    if key in _INT_FIELDS:
        return _to_int(key, value)
    if key in _FLOAT_FIELDS:
        return _to_float(key, value)
    if key == "stop_token_ids" and isinstance(value, (list, tuple)):
        return [_to_int(key, v) for v in value]
    if key == "logit_bias" and isinstance(value, Mapping):  # JSON object keys are strings
        return {_to_int(key, k): _to_float(key, v) for k, v in value.items()}
    return value


def _to_float(key: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise SamplingParamsError(key, f"must be a number, got {value!r}") from None
    return value


def _to_int(key: str, value: Any) -> Any:
    """Integers, integral floats (16.0) and their string forms ("16", "16.0") become int."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise SamplingParamsError(key, f"must be an integer, got {value!r}") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise SamplingParamsError(key, f"must be an integer, got {value!r}")
        return int(value)
    return value
