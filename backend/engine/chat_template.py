"""Chat conversations -> prompt token ids through the model's own chat template, validated first."""

from __future__ import annotations

from typing import Any

from pagetron.backend.core.chat_messages import validate_messages, validate_tools
from pagetron.backend.core.errors import InvalidRequestError


def encode_chat(
    tokenizer: Any, messages: Any, add_generation_prompt: bool = True, tools: Any = None
) -> list[int]:
    """Validates the conversation, renders it with the tokenizer's chat template and tokenizes it (the
    template writes the special tokens itself, so none are added). ``tools`` (OpenAI's) go to the
    template as HF's ``tools`` argument; a template that does not use them ignores them, as in vLLM."""
    clean = validate_messages(messages)
    extra = {"tools": validate_tools(tools)} if tools else {}
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("messages", "this model has no chat template")
    try:
        text = tokenizer.apply_chat_template(
            clean, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )
    except Exception as e:  # jinja2's TemplateError, or a raise_exception() inside the template
        raise InvalidRequestError("messages", f"the model's chat template refused them: {e}") from None
    return tokenizer(text, add_special_tokens=False).input_ids
