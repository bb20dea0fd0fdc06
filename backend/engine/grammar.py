"""Grammars for constrained decoding, on xgrammar: checked when a request arrives, compiled on worker
threads, cached by content, one matcher per sequence.

    request ──parse (caller's thread: a bad schema is refused here, naming the problem)
            └─compile (pool thread) ──> Future[CompiledGrammar], shared by equal constraints
    Sequence.grammar = SequenceGrammar(future): the scheduler passes it over until the future is done;
    then its matcher fills the sequence's bitmask row each step and accepts each sampled token.

NOTE: xgrammar is chosen over llguidance for its compiled-grammar cache (equal schemas compile once per
process) and because its masks come from a per-state token cache filled at compile time, so a step's
mask fill costs microseconds a row (measured here: 64 rows of SmolLM2's 49,152-token vocabulary in
0.2 ms); both parse the same JSON-schema subset for our tests.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pagetron.backend.core.errors import AtCapacityError, InvalidRequestError
from pagetron.backend.core.structured_outputs import StructuredOutputsParams

CACHE_SIZE = 256  # distinct constraints whose compiled grammar stays in memory
# NOTE: JSON allows any whitespace between tokens, and a model that starts emitting it (newlines, runs of
# spaces) under a schema can go on until max_tokens. Runs are capped at this many characters, which
# still fits JSON pretty-printed several levels deep.
JSON_MAX_WHITESPACE = 32
BATCH_FILL_ROWS = 8  # from this many constrained rows on, masks are filled by xgrammar's threads
# compiles still running past their time limit (their threads cannot be taken back); at this many, a new
# constraint is refused until some finish
MAX_OVERDUE_COMPILES = 8
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")


class SequenceGrammar:
    """One sequence's grammar state (``core.structured_outputs.GrammarState``); matchers are per sequence,
    the compiled grammar is shared. Used by the engine thread only, once ``ready``."""

    def __init__(self, compiled: Future, deadline: float, batch: Any = None):
        self.compiled, self.deadline = compiled, deadline
        self.batch = batch  # the service's xgrammar BatchGrammarMatcher (None: rows are filled one by one)
        self._matcher: Any = None

    @property
    def ready(self) -> bool:
        done = self.compiled.done() and not self.compiled.cancelled()
        return done and self.compiled.exception() is None

    def failure(self, now: float) -> str | None:
        """Why this sequence can never run (the compile failed or took too long), or None."""
        if not self.compiled.done():
            return "the grammar did not compile in time" if now > self.deadline else None
        if self.compiled.cancelled():
            return "the grammar's compile was cancelled (the engine is shutting down)"
        error = self.compiled.exception()
        return None if error is None else f"the grammar failed to compile: {error_text(error)}"

    @property
    def matcher(self) -> Any:
        if self._matcher is None:
            import xgrammar

            self._matcher = xgrammar.GrammarMatcher(self.compiled.result())
        return self._matcher

    def accept(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


def fill_bitmasks(states: list[SequenceGrammar], bitmask: Any) -> None:
    """One bitmask row per state; many rows are filled in parallel by the batch matcher of the service the
    states came from (xgrammar releases the GIL). A plain function, so the scheduler holding it keeps no
    engine alive."""
    done = {row for row, state in enumerate(states) if state.is_terminated()}
    batch = states[0].batch if states else None
    if batch is not None and not done and len(states) >= BATCH_FILL_ROWS:
        batch.batch_fill_next_token_bitmask([s.matcher for s in states], bitmask)
        return
    for row, state in enumerate(states):
        if row in done:  # ran ahead past its grammar's end (asynchronous scheduling): dropped, allow all
            bitmask[row] = -1
        else:
            state.fill_bitmask(bitmask, row)


class GrammarService:
    """Parses and compiles constraints for one tokenizer; thread-safe (requests are parsed on the serving
    threads, compiled on ``max_threads`` pool threads)."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: list[int],
        compile_timeout_s: float,
        max_threads: int = 2,
    ):
        import xgrammar

        self._xgr = xgrammar
        self.compile_timeout_s = compile_timeout_s
        self._compiler = xgrammar.GrammarCompiler(
            _tokenizer_info(xgrammar, tokenizer, vocab_size, stop_token_ids), max_threads=max_threads
        )
        self._max_threads = max_threads
        self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix="pagetron-grammar")
        self._generation = 0  # which pool is current (see _make_room)
        self._running: dict[int, tuple[int, float]] = {}  # compile -> (its pool's generation, start time)
        self._tasks = itertools.count()
        self._batch = xgrammar.BatchGrammarMatcher(max_threads=min(8, os.cpu_count() or 1))
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Future] = OrderedDict()  # constraint key -> compiled grammar

    def grammars(self, params: StructuredOutputsParams, n: int) -> list[SequenceGrammar]:
        """Grammar states for the ``n`` sequences of one request. Raises InvalidRequestError naming the
        problem if the constraint cannot be parsed; compiling goes on in the background."""
        key = params.key()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
        if compiled is None:
            grammar = self._parse(params)  # outside the lock: a large schema takes a while
            with self._lock:
                compiled = self._cache.get(key)
                if compiled is None:
                    self._make_room()
                    compiled = self._cache[key] = self._pool.submit(
                        self._compile, grammar, next(self._tasks), self._generation
                    )
                    while len(self._cache) > CACHE_SIZE:
                        self._cache.popitem(last=False)
        deadline = time.monotonic() + self.compile_timeout_s
        return [SequenceGrammar(compiled, deadline, self._batch) for _ in range(n)]

    def _parse(self, params: StructuredOutputsParams) -> Any:
        xgr, kind = self._xgr, params.kind
        try:
            if kind == "json":
                schema = json.loads(params.json) if isinstance(params.json, str) else params.json
                _check_schema(schema)
                return xgr.Grammar.from_json_schema(
                    json.dumps(schema),
                    any_whitespace=not params.disable_any_whitespace,
                    max_whitespace_cnt=JSON_MAX_WHITESPACE,
                )
            if kind == "json_object":
                return xgr.Grammar.builtin_json_grammar()
            if kind == "regex":
                return xgr.Grammar.from_regex(params.regex)
            if kind == "choice":
                return xgr.Grammar.from_ebnf(
                    "root ::= " + " | ".join(_ebnf_literal(c) for c in params.choice)
                )
            return xgr.Grammar.from_ebnf(params.grammar)
        except InvalidRequestError:
            raise
        except Exception as e:  # noqa: BLE001 (xgrammar raises RuntimeError / ValueError with the reason)
            raise InvalidRequestError(f"structured_outputs.{kind}", error_text(e)) from None

    # NOTE: xgrammar's compile cannot be interrupted, so one past its time limit keeps its pool thread
    # until it returns (its requests were refused at the limit). Once every thread of the pool is held
    # so, the pool is set aside (its threads end when their compiles do) and a new one takes new
    # constraints; those that were queued behind the held threads leave the cache, so asking again
    # compiles them afresh. At MAX_OVERDUE_COMPILES held threads in all, new constraints are refused as
    # the server being at capacity.
    def _make_room(self) -> None:
        """Called with the lock held, before a compile is submitted."""
        now = time.monotonic()
        overdue = [gen for gen, started in self._running.values() if now - started > self.compile_timeout_s]
        if len(overdue) >= MAX_OVERDUE_COMPILES:
            raise AtCapacityError(
                f"{len(overdue)} grammars are still compiling past grammar_compile_timeout_s "
                f"({self.compile_timeout_s:g} s); retry later"
            )
        if overdue.count(self._generation) >= self._max_threads:
            self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(self._max_threads, thread_name_prefix="pagetron-grammar")
            self._generation += 1
            for key in [k for k, future in self._cache.items() if not future.done()]:
                del self._cache[key]

    def _compile(self, grammar: Any, task: int, generation: int) -> Any:
        with self._lock:
            self._running[task] = (generation, time.monotonic())
        try:
            return self._compiler.compile_grammar(grammar)
        finally:
            with self._lock:
                del self._running[task]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _tokenizer_info(xgr: Any, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """The vocabulary as xgrammar sees it. Special tokens are blanked, which makes them never allowed
    (a chat model's <|im_start|> is text inside a JSON string otherwise); the stop tokens end a grammar."""
    detected = xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
    )
    vocab = [""] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size:
            vocab[index] = token
    for index in tokenizer.all_special_ids:
        if index < vocab_size:
            vocab[index] = ""
    return xgr.TokenizerInfo(
        vocab,
        detected.vocab_type,
        vocab_size=vocab_size,
        stop_token_ids=list(stop_token_ids),
        add_prefix_space=detected.add_prefix_space,
    )


def _check_schema(schema: Any) -> None:
    """A schema that breaks its own meta-schema ({"minimum": "ten"}) is refused with jsonschema's words."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "<root>"
        raise InvalidRequestError(
            "structured_outputs.json", f"not a valid JSON schema at {where}: {e.message}"
        ) from None


def _ebnf_literal(text: str) -> str:
    """``text`` as an xgrammar EBNF string literal (its escapes are JSON's)."""
    return json.dumps(text, ensure_ascii=False)


def error_text(error: BaseException) -> str:
    """xgrammar's message without the C++ source location it starts with."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    first = _XGRAMMAR_PREFIX.sub("", lines[0]) if lines else type(error).__name__
    return " ".join([first, *lines[1:2]])[:500]
