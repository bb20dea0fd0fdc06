"""The error every refused request raises (re-exported by llm_engine, where it is usually imported from)."""

from __future__ import annotations

# How a refusal for lack of room begins: the OpenAI frontend turns exactly these into 429s.
AT_CAPACITY = "the server is at capacity"


class InvalidRequestError(ValueError):
    """A request the engine refuses; ``field`` names what is wrong. Other requests are unaffected."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class AtCapacityError(RuntimeError):
    """A request refused for lack of room, not for what it asks: retry later (UNAVAILABLE, HTTP 429)."""

    def __init__(self, reason: str):
        super().__init__(f"{AT_CAPACITY}: {reason}")
