"""Offline batch generation, shaped like vLLM's ``LLM``: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm.auto import tqdm

from pagetron.backend.core.config import EngineConfig
from pagetron.backend.core.errors import InvalidRequestError
from pagetron.backend.core.lora import LoRARequest
from pagetron.backend.core.sampling_params import SamplingParams
from pagetron.backend.engine.chat_template import encode_chat
from pagetron.backend.engine.llm_engine import LLMEngine, PromptType
from pagetron.backend.engine.output_processor import OutputKind
from pagetron.backend.engine.outputs import RequestOutput
from pagetron.backend.executor.executor import ExecutorFactory

Messages = list[dict[str, str]]


class LLM:
    """``LLM(model=None, **engine_args)``: model is an HF folder, a .gguf file, or None for the bundled
    SmolLM2-135M-Instruct. Engine arguments are the fields of :class:`EngineConfig`;
    ``executor_factory`` replaces what runs the model (see pagetron.backend.executor)."""

    def __init__(
        self, model: str | None = None, *, executor_factory: ExecutorFactory | None = None, **engine_args: Any
    ):
        config = EngineConfig.from_dict({"model": model, **engine_args})
        self.engine = LLMEngine(config, executor_factory)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | SequenceABC[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order. Every prompt is validated before any runs, so a
        bad one raises (naming its index and field) without side effects. ``lora_request``: one adapter
        for every prompt, or one (or None, the base model) per prompt."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, SequenceABC) and len(prompts) > 0 and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if not isinstance(prompts, SequenceABC):
            raise InvalidRequestError(
                "prompts", f"expected a prompt or a list of prompts, got {type(prompts).__name__}"
            )
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        loras = (
            list(lora_request)
            if isinstance(lora_request, SequenceABC) and not isinstance(lora_request, str)
            else [lora_request] * len(prompts)
        )
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(loras)} LoRA requests")
        engine = self.engine
        prepared = []
        base = next(engine._request_ids)
        for i, (prompt, params, lora) in enumerate(zip(prompts, params_list, loras)):
            request_id = f"offline-{base}-{i}"
            try:
                text, seqs = engine.make_sequences(request_id, prompt, params, lora_request=lora)
                prepared.append((request_id, text, seqs))
            except InvalidRequestError as e:
                raise InvalidRequestError(e.field, f"prompt {i}: {e}") from None
        for request_id, text, seqs in prepared:
            engine.enqueue(request_id, text, seqs, OutputKind.FINAL_ONLY)
        return self._run(len(prepared), use_tqdm, [p[0] for p in prepared])

    def chat(
        self,
        messages: Messages | SequenceABC[Messages],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation, then generates."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        prompts = [{"prompt_token_ids": self.encode_chat(m, add_generation_prompt)} for m in messages]
        return self.generate(prompts, sampling_params, use_tqdm)

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        return encode_chat(self.tokenizer, messages, add_generation_prompt)

    def _run(self, num_requests: int, use_tqdm: bool, order: list[str]) -> list[RequestOutput]:
        mine = set(order)
        finished: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=num_requests, desc="Generating", disable=not use_tqdm, dynamic_ncols=True) as bar:
                while len(finished) < num_requests:
                    for out in self.engine.step():
                        if out.error is not None and out.request_id in mine:
                            index = order.index(out.request_id)
                            raise InvalidRequestError("structured_outputs", f"prompt {index}: {out.error}")
                        if out.finished and out.request_id in mine:
                            finished[out.request_id] = out
                            bar.update(1)
        finally:
            for request_id in mine - finished.keys():  # interrupted: leave the engine clean
                self.engine.abort_request(request_id)
        return [finished[r] for r in order]
