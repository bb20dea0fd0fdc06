"""The engine: validated requests in, one schedule -> execute -> update -> outputs step at a time."""

from __future__ import annotations

import atexit
import functools
import gc
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any, TypeVar

from pagetron.backend.core.block_manager import BlockManager
from pagetron.backend.core.config import EngineConfig
from pagetron.backend.core.detokenizer import IncrementalDetokenizer
from pagetron.backend.core.errors import InvalidRequestError
from pagetron.backend.core.lora import LoRARequest
from pagetron.backend.core.sampling_params import SamplingParams
from pagetron.backend.core.scheduler import Scheduler
from pagetron.backend.core.sequence import Sequence
from pagetron.backend.core.step import SchedulerOutput
from pagetron.backend.engine.chat_template import encode_chat
from pagetron.backend.engine.grammar import (
    GrammarService,
    SequenceGrammar,
    fill_bitmasks,
    grammar_vocab_size,
)
from pagetron.backend.engine.lora_registry import LoRARegistry
from pagetron.backend.engine.output_processor import OutputKind, OutputProcessor
from pagetron.backend.engine.outputs import RequestOutput
from pagetron.backend.executor.executor import ExecutorFactory, LaunchedStep, default_executor
from pagetron.backend.executor.spec import ModelSpec

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]  # dict: {"prompt"}, {"prompt_token_ids"} or {"messages"}

__all__ = ["LLMEngine", "PromptType"]

T = TypeVar("T")

COMPILE_POLL_S = 0.05
# NOTE: with asynchronous scheduling a step's grammar masks are filled on a thread beside the engine thread
# (see _step_ahead), which only pays where cores are free for it and xgrammar's fill threads (up to 8):
# on 2 cores the fill slowed by more than it overlapped (an emulated device, 64 JSON-schema rows).
FILL_THREAD_MIN_CPUS = 8
# NOTE: a thread that released the GIL (a mask fill in xgrammar, a Triton response send) must take it back
# to return, and while another thread runs Python that takes one switch interval: 5 ms by default, which
# made a 1 ms fill take 6 ms as its thread saw it (this machine, a busy engine thread) and, on an H100
# host, left the engine thread waiting for most of each step's 3.6 ms "fill". An engine that fills masks
# on a thread shortens the interval for everyone in its process when its first constrained request comes
# (the serving process does when it starts, for its sends).
GIL_SWITCH_INTERVAL_S = 0.0005


def shorten_gil_switch_interval() -> None:
    """Sets the process's GIL switch interval to GIL_SWITCH_INTERVAL_S unless it is already shorter."""
    if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


class LLMEngine:
    """``executor_factory`` builds what runs the model (default: one worker in this process); tests and
    fault injection pass a factory that wraps the default."""

    def __init__(self, config: EngineConfig, executor_factory: ExecutorFactory | None = None):
        self.config = config
        spec = ModelSpec.from_config(config)
        self.tokenizer = spec.files.tokenizer
        self.model_config = spec.model_config
        self.max_model_len = spec.max_model_len
        self.eos_token_ids = set(spec.eos_token_ids)
        vocab = self.model_config.vocab_size
        self.grammar_vocab_size = grammar_vocab_size(self.tokenizer, vocab, sorted(self.eos_token_ids))
        self.executor = (executor_factory or default_executor)(spec)
        self.block_manager = BlockManager(
            self.executor.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
            enable_chunked_prefill=config.enable_chunked_prefill,
            reserve_kv_for_growth=config.reserve_kv_for_growth,
            max_loras=config.max_loras if config.enable_lora else 0,
            vocab_size=self.grammar_vocab_size,
            fill_bitmasks=fill_bitmasks,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.loras = LoRARegistry(config.lora_modules, config.lora_dir)
        wanted = config.async_scheduling
        if wanted is None:  # the default: where it overlaps anything
            wanted = self.executor.overlaps_host
        self.async_scheduling = wanted and self.executor.supports_async
        if config.async_scheduling and not self.async_scheduling:
            logger.warning("async_scheduling: this executor runs each step through; stepping synchronously")
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None
        self.fill_masks_on_thread = usable_cpus() >= FILL_THREAD_MIN_CPUS
        self._request_ids = itertools.count()
        self._grammar_service: GrammarService | None = None  # made when a request first needs it
        self._grammar_lock = threading.Lock()
        self._compiling: dict[str, SequenceGrammar] = {}  # request id -> a grammar not compiled yet
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        freeze_gc_heap()

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """UTF-8 bytes of the longest vocabulary entry: no token covers more text (bounds a prompt's tokens
        from below by its bytes, so an oversize one is refused without tokenizing it)."""
        if self.tokenizer is None:
            return 1
        vocab = self.tokenizer.get_vocab()
        return max(len(self.tokenizer.convert_tokens_to_string([t]).encode()) for t in vocab) or 1

    # ---- requests -------------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        text = None
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "messages", "tools"}
            if unknown:
                raise InvalidRequestError("prompt", f"unknown prompt keys {sorted(unknown)}")
            if "messages" in prompt:
                prompt = encode_chat(self.tokenizer, prompt["messages"], tools=prompt.get("tools"))
            elif "prompt_token_ids" in prompt:
                text = prompt.get("prompt") if isinstance(prompt.get("prompt"), str) else None
                prompt = prompt["prompt_token_ids"]
            else:
                prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "the prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this model has no tokenizer; send prompt token ids")
            ids = self.tokenizer(prompt).input_ids
            if not ids:
                raise InvalidRequestError("prompt", "the prompt tokenizes to nothing")
            self._check_token_ids("prompt", ids)
            return prompt, ids
        if isinstance(prompt, SequenceABC) and not isinstance(prompt, bytes):
            ids = list(prompt)
            if not ids:
                raise InvalidRequestError("prompt_token_ids", "the prompt is empty")
            self._check_token_ids("prompt_token_ids", ids)
            return text, ids
        raise InvalidRequestError(
            "prompt", f"expected a string or a list of token ids, got {type(prompt).__name__}"
        )

    def _check_token_ids(self, field: str, ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidRequestError(field, f"{t!r} is not a token id in [0, {vocab})")

    def make_sequences(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> tuple[str | None, list[Sequence]]:
        """Validates one request and builds its sequences without queueing anything. A LoRA adapter is
        loaded (and checked) here, the first time a request names it."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                "sampling_params", f"expected SamplingParams, got {type(params).__name__}"
            )
        if request_id in self.output_processor.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        text, ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt",
                f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} "
                "(prompt plus at least one generated token must fit)",
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                "max_tokens",
                f"the prompt has {len(ids)} tokens and max_tokens is {params.max_tokens}, more than "
                f"max_model_len {self.max_model_len} allows; at most {self.max_model_len - len(ids)} fit",
            )
        if params.logit_bias:
            self._check_token_ids("logit_bias", sorted(params.logit_bias))
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError(
                "stop", "stop strings need a tokenizer; this model has none (use stop_token_ids)"
            )
        longest = self.max_model_len if params.max_tokens is None else len(ids) + params.max_tokens
        capacity = self.block_manager.num_blocks * self.config.block_size
        if longest > capacity:
            raise InvalidRequestError(
                "max_tokens",
                f"the request may grow to {longest} tokens but the whole KV cache holds {capacity}; "
                "lower max_tokens or give the engine more KV-cache memory",
            )
        if lora_request is None and params.lora_name is not None:
            if not self.config.enable_lora:
                raise InvalidRequestError(
                    "lora_name", "this model serves no LoRA adapters (enable_lora is off)"
                )
            lora_request = self.loras.resolve(params.lora_name)
        if lora_request is not None:
            self._add_lora(lora_request)
        grammars: list[SequenceGrammar | None] = [None] * params.n
        if params.structured_outputs is not None:
            grammars = self.grammar_service().grammars(params.structured_outputs, params.n)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs = [
            Sequence(
                ids,
                params,
                request_id,
                index=i,
                arrival_time=arrival,
                detokenizer=self._detokenizer(ids, params),
                lora=lora_request,
                grammar=grammars[i],
            )
            for i in range(params.n)
        ]
        return text, seqs

    def grammar_service(self) -> GrammarService:
        """Compiles constrained requests' grammars (any thread; xgrammar is loaded on first use)."""
        with self._grammar_lock:
            if self._grammar_service is None:
                if self.tokenizer is None:
                    raise InvalidRequestError(
                        "structured_outputs", "constrained decoding needs a tokenizer; this model has none"
                    )
                if self.fill_masks_on_thread:  # once, with the first constrained request
                    shorten_gil_switch_interval()
                self._grammar_service = GrammarService(
                    self.tokenizer,
                    self.grammar_vocab_size,
                    sorted(self.eos_token_ids),
                    self.config.grammar_compile_timeout_s,
                )
            return self._grammar_service

    def _add_lora(self, lora_request: LoRARequest) -> None:
        if not isinstance(lora_request, LoRARequest):
            raise InvalidRequestError(
                "lora_request", f"expected LoRARequest, got {type(lora_request).__name__}"
            )
        if not self.config.enable_lora:
            raise InvalidRequestError(
                "lora_request", "LoRA adapters need the engine argument enable_lora=True"
            )
        try:
            self.executor.add_lora(lora_request)
        except ValueError as e:
            raise InvalidRequestError("lora_request", f"adapter {lora_request.lora_name!r}: {e}") from None

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, params) if self.tokenizer else None

    def add_request(
        self,
        prompt: PromptType,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
        lora_request: LoRARequest | None = None,
    ) -> str:
        request_id = str(next(self._request_ids)) if request_id is None else request_id
        text, seqs = self.make_sequences(
            request_id, prompt, params or SamplingParams(), lora_request=lora_request
        )
        self.enqueue(request_id, text, seqs, output_kind)
        return request_id

    def enqueue(
        self,
        request_id: str,
        prompt: str | None,
        seqs: list[Sequence],
        output_kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> None:
        self.output_processor.add_request(request_id, prompt, seqs, output_kind)
        if seqs[0].grammar is not None and not seqs[0].grammar.ready:
            self._compiling[request_id] = seqs[0].grammar
        for seq in seqs:
            self.scheduler.add(seq)
        self.num_prompt_tokens += seqs[0].num_prompt_tokens

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Ends every sequence of the request at once and frees its KV blocks; returns its last output."""
        self._compiling.pop(request_id, None)
        state = self.output_processor.pop(request_id)
        if state is None:
            return None
        self.scheduler.abort(state.seqs)
        return state.make_output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.requests)

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine iteration. Not thread-safe: add, abort and step must all run on one thread."""
        refused = self._check_grammars() if self._compiling else []
        if self.async_scheduling:
            return refused + self._step_ahead()
        scheduled = self.scheduler.schedule()
        result = self._guarded(lambda: self.executor.execute(scheduled))
        updates = self.scheduler.update(scheduled, result)
        return refused + self.output_processor.process(updates)

    # NOTE on compiling grammars: a request whose grammar is still compiling waits in the queue while
    # others run (the scheduler passes it over). The engine waits on a compile only when nothing else can
    # run, and then at most COMPILE_POLL_S before stepping again (aborts and new requests get in).
    def _check_grammars(self) -> list[RequestOutput]:
        """Refuses requests whose grammar failed or timed out; forgets those that compiled."""
        now, refused = time.monotonic(), []
        for request_id, grammar in list(self._compiling.items()):
            problem = grammar.failure(now)
            if problem is not None:
                output = self.abort_request(request_id)
                if output is not None:
                    output.error = problem
                    refused.append(output)
            if problem is not None or grammar.ready:
                self._compiling.pop(request_id, None)
        if self._compiling and not self.scheduler.running and not refused:
            if self.scheduler.num_compiling() == len(self.scheduler.waiting):
                pending = [g.compiled for g in self._compiling.values()]
                wait(pending, timeout=COMPILE_POLL_S, return_when=FIRST_COMPLETED)
        return refused

    # NOTE on asynchronous scheduling (SGLang's overlap scheduler, vLLM's async scheduling): one step is
    # always in flight. Step N+1 is scheduled and launched before step N's result is applied, so the host
    # work of N+1 (schedule, inputs) and of N (update, detokenize, outputs) overlaps N and N+1 on the
    # device. A sequence sampled by N is scheduled in N+1 with that token pending; the runner takes it from
    # N's samples on the device. Outputs are the same as stepping synchronously (the scheduler only runs a
    # sequence ahead where it can; see Scheduler._may_run_ahead), and each step() returns the outputs of
    # the step before. A constrained row that runs ahead needs N's token in its grammar before its mask
    # can be filled: the runner's launch of such a step queues its forward pass only, and its sampling is
    # queued by launched.sample() once update(N) has run. Where cores allow, the mask fill then runs on a
    # thread while the host detokenizes N and schedules N+2, and the sampling is queued just before N+2's
    # forward pass (which takes N+1's samples as inputs):
    #
    #   host:   [sched N+2][sample N+1][launch N+2][wait N+1][update N+1][outputs N+1]  [sched N+3] ...
    #   thread:    ... fill N+1 ]                                        [ fill N+2 ...              ]
    #   device:  [ N+1 forward       ][N+1 sampling][ N+2 forward                ][N+2 sampling] ...
    def _step_ahead(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if self._in_flight is not None:
            self._guarded(self._in_flight[1].sample)  # no-op unless its sampling still waits (see above)
        launched = self._guarded(lambda: self.executor.launch(scheduled))
        previous, self._in_flight = self._in_flight, (scheduled, launched)
        if previous is None:
            return []
        updates = self.scheduler.update(previous[0], self._guarded(previous[1].result))
        # the grammars have seen the previous step's tokens now
        if scheduled.grammar is not None and self.fill_masks_on_thread:
            scheduled.grammar.start_fill()
        else:
            self._guarded(launched.sample)
        return self.output_processor.process(updates)

    def _guarded(self, run: Callable[[], T]) -> T:
        try:
            return run()
        except BaseException:
            # Blocks are registered in the prefix cache when scheduled, before the forward pass writes
            # them: after a failed pass their KV is garbage. Abort everything in flight, forget the cache.
            self._in_flight = None
            for request_id in self.output_processor.request_ids():
                self.abort_request(request_id)
            self.block_manager.reset_prefix_cache()
            raise

    def health(self) -> str | None:
        """Why this engine can run no more steps, or None (any thread; see Executor.health)."""
        return self.executor.health()

    def shutdown(self) -> None:
        gc.unfreeze()
        if self._grammar_service is not None:
            self._grammar_service.shutdown()
        self.executor.shutdown()


# NOTE on the garbage collector: a full collection scans every tracked object, and after start-up most of
# them are the process's static heap (modules, the model's layers and parameters, the tokenizer): about
# 130 ms a pass with an 8B-shape model, paid inside a step every few hundred steps. Freezing the heap once
# the engine is built (as vLLM's engine core does) leaves collections only the objects made while serving.
# That is safe because the engine holds no reference cycles: dropped, it is freed by reference counts alone
# (tests/test_engine.py pins this), not left frozen. shutdown() and the interpreter's exit unfreeze (frozen
# objects are never finalized: extension modules would report them as leaked).
def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def freeze_gc_heap() -> None:
    gc.collect()  # garbage frozen now could never be collected
    gc.freeze()
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)
