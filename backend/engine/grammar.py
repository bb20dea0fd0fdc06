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

import copy
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pagetron.backend.core.errors import AtCapacityError, InvalidRequestError
from pagetron.backend.core.json_schema import UnsupportedSchemaError, check_enforceable, subschemas
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
        return self.compiled.done() and self.compiled.exception() is None

    def failure(self, now: float) -> str | None:
        """Why this sequence can never run (the compile failed or took too long), or None."""
        if not self.compiled.done():
            return "the grammar did not compile in time" if now > self.deadline else None
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


@dataclass
class _Compile:
    """One grammar to compile; ``future`` is what the cache and the sequences hold."""

    build: Callable[[Any], Any]  # xgrammar's GrammarCompiler -> CompiledGrammar (see _parse)
    future: Future = field(default_factory=Future)
    started: float | None = None  # when a pool thread took it
    pool: int = -1  # which pool's thread


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
        self._pools = [ThreadPoolExecutor(max_threads, thread_name_prefix="pagetron-grammar")]
        self._queued: list[_Compile] = []  # submitted, not taken by a thread yet
        self._running: list[_Compile] = []  # on a thread now
        self._closed = False
        self._batch = xgrammar.BatchGrammarMatcher(max_threads=min(8, os.cpu_count() or 1))
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Future] = OrderedDict()  # constraint key -> compiled grammar

    def grammars(self, params: StructuredOutputsParams, n: int) -> list[SequenceGrammar]:
        """Grammar states for the ``n`` sequences of one request. Raises InvalidRequestError naming the
        problem if the constraint cannot be parsed, AtCapacityError if too many compiles are stuck past
        their time limit; compiling goes on in the background."""
        key = params.key()
        with self._lock:
            self._make_room()
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
        if compiled is None:
            build = self._parse(params)  # outside the lock: a large schema takes a while
            with self._lock:
                compiled = self._cache.get(key)
                if compiled is None:
                    self._refuse_if_stuck()
                    job = _Compile(build)
                    self._queued.append(job)
                    self._pools[-1].submit(self._run, job, len(self._pools) - 1)
                    compiled = self._cache[key] = job.future
                    while len(self._cache) > CACHE_SIZE:
                        self._cache.popitem(last=False)
        deadline = time.monotonic() + self.compile_timeout_s
        return [SequenceGrammar(compiled, deadline, self._batch) for _ in range(n)]

    # NOTE: xgrammar's compile cannot be interrupted, so one past its time limit keeps its pool thread
    # until it returns (its requests were refused at the limit; a request for the same constraint waits
    # on the same compile). Once every thread of the newest pool is held so, a new pool takes over: the
    # compiles queued behind the held threads move to it, and the old pool's threads end with their
    # compiles. At MAX_OVERDUE_COMPILES held threads in all, new constraints are refused as the server
    # being at capacity.
    def _overdue(self) -> list[_Compile]:
        now = time.monotonic()
        return [job for job in self._running if now - (job.started or now) > self.compile_timeout_s]

    def _make_room(self) -> None:
        """Called with the lock held: a new pool if the newest one's threads are all held."""
        newest = len(self._pools) - 1
        if self._closed or sum(job.pool == newest for job in self._overdue()) < self._max_threads:
            return
        self._pools[-1].shutdown(wait=False)  # its threads end when their compiles do
        self._pools.append(ThreadPoolExecutor(self._max_threads, thread_name_prefix="pagetron-grammar"))
        for job in self._queued:  # the old pool's work item finds the job taken and skips it
            self._pools[-1].submit(self._run, job, newest + 1)

    def _refuse_if_stuck(self) -> None:
        if self._closed:
            raise InvalidRequestError("structured_outputs", "the engine is shutting down")
        overdue = len(self._overdue())
        if overdue >= MAX_OVERDUE_COMPILES:
            raise AtCapacityError(
                f"{overdue} grammars are still compiling past grammar_compile_timeout_s "
                f"({self.compile_timeout_s:g} s); retry later"
            )

    def _run(self, job: _Compile, pool: int) -> None:
        with self._lock:
            if job.started is not None or job.future.done():  # taken by a newer pool, or shut down
                return
            job.started, job.pool = time.monotonic(), pool
            self._queued.remove(job)
            self._running.append(job)
        try:
            job.future.set_result(job.build(self._compiler))
        except Exception as e:  # noqa: BLE001 (the grammar's error, read where its requests are checked)
            job.future.set_exception(e)
        finally:
            with self._lock:
                self._running.remove(job)

    # NOTE: xgrammar 0.2.8 compiles a Grammar object by printing it as EBNF and parsing that again, and its
    # printer writes U+0080-U+00FF as \xHH escapes that its parser reads with every hex digit after them
    # ("éa" is read as U+0E9A): enums, choices, classes and user grammars alike. Its compile_* functions
    # that take source text parse it once and are right. So each constraint is turned into source text
    # here (a JSON schema into xgrammar's EBNF, corrected by exact_json_ebnf), parsed to refuse a bad one
    # at once, and compiled from that text on a pool thread.
    def _parse(self, params: StructuredOutputsParams) -> Callable[[Any], Any]:
        """Checks the constraint (InvalidRequestError naming the problem) and returns how to compile it."""
        xgr, kind = self._xgr, params.kind
        try:
            if kind == "json":
                schema = json.loads(params.json) if isinstance(params.json, str) else params.json
                _check_schema(schema)
                grammar = xgr.Grammar.from_json_schema(
                    json.dumps(short_strings_as_patterns(schema)),
                    any_whitespace=not params.disable_any_whitespace,
                    max_whitespace_cnt=JSON_MAX_WHITESPACE,
                )
                ebnf = exact_json_ebnf(str(grammar))
            elif kind == "json_object":
                ebnf = exact_json_ebnf(str(xgr.Grammar.builtin_json_grammar()))
            elif kind == "regex":
                regex = params.regex
                xgr.Grammar.from_regex(regex)
                return lambda compiler: compiler.compile_regex(regex)
            elif kind == "choice":
                ebnf = "root ::= " + " | ".join(_ebnf_literal(c) for c in params.choice)
            else:
                ebnf = params.grammar
            xgr.Grammar.from_ebnf(ebnf)  # what will be compiled, parsed now (ours for json and json_object)
            return lambda compiler: compiler.compile_grammar(ebnf)
        except InvalidRequestError:
            raise
        except Exception as e:  # noqa: BLE001 (xgrammar raises RuntimeError / ValueError with the reason)
            raise InvalidRequestError(f"structured_outputs.{kind}", error_text(e)) from None

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            for pool in self._pools:
                pool.shutdown(wait=False, cancel_futures=True)
            for job in self._queued:
                job.future.set_exception(RuntimeError("the engine is shutting down"))
            self._queued.clear()


# NOTE: a model's vocabulary is often padded past its tokenizer's (the 8B benchmark shape: 128,256 rows for
# SmolLM2's 49,152 tokens; Qwen2 pads 151,665 tokens to 151,936). xgrammar 0.2.8 treats every padding id as
# a special token and pays for it in every fill: inside a JSON string a row took 100-125 us with the
# padding and 5 us without. Grammars are therefore filled over the tokenizer's ids only; the bitmask is
# that much narrower, and the tokens past it are forbidden where the mask is applied (token_bitmask.py),
# which is what the padding would have got. The width is rounded up to whole 32-id words: xgrammar sets
# every bit of a row's last word where it allows nearly everything (inside a string), so padding ids in
# that word must be in xgrammar's vocabulary (blank, so never allowed) to have their bits cleared.
def grammar_vocab_size(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> int:
    """The token ids a grammar's bitmask covers: the tokenizer's (and the stop tokens') rounded up to a
    multiple of 32, at most the model's ``vocab_size``; all of them without a tokenizer."""
    if tokenizer is None:
        return vocab_size
    highest = max([*tokenizer.get_vocab().values(), *stop_token_ids], default=vocab_size - 1)
    return min(vocab_size, -(-(highest + 1) // 32) * 32)


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
    try:
        check_enforceable(schema)
    except UnsupportedSchemaError as e:
        raise InvalidRequestError("structured_outputs.json", str(e)) from None


# NOTE: xgrammar 0.2.8 unrolls a string's maxLength into nested rules whose token masks are mostly
# decided at fill time, the more so the fewer characters remain: a bitmask row inside a 12-character
# string costs 2-6 ms to fill, and near the end of a 40- or 60-character one up to 5 ms (0.6-0.8 ms on
# average over the string), against 5-100 us elsewhere (SmolLM2's vocabulary). The same length as a
# pattern over a JSON string's characters compiles to one regular expression and fills in 60-140 us
# anywhere in it. Both allow the same strings once the maxLength rule's characters are made JSON's
# (exact_json_ebnf: xgrammar's let raw control characters through); escapes are allowed by neither.
# xgrammar refuses a repetition bound above 128, so longer strings keep maxLength (splitting the bound,
# {0,128}{0,72}, compiles in twice the time and fills in 4-5 times maxLength's).
# Each distinct bound is a regular expression of its own to compile, about 0.35 s near 128 on the 2-core
# machine (equal bounds share one), so past 16 characters only the LONG_PATTERNS_MAX shortest distinct
# bounds of a schema are rewritten: a schema of 40 distinct bounds of 89-128 compiled in 15 s so.
SHORT_STRING_MAX = 128
ALWAYS_PATTERN_MAX = 16  # bounds up to this are always rewritten (cheap to compile, costliest to fill)
LONG_PATTERNS_MAX = 8
# a JSON string's character without escapes, one alternative per UTF-8 length: xgrammar 0.2.8 turns a
# pattern's class whose range spans several lengths ([^"\\\x00-\x1f]) into bytes that also take overlong
# forms (E0 93 99) and surrogates (ED A0 80), which are not UTF-8
STRING_CHARACTER = (
    r"(?:[\x20\x21\x23-\x5B\x5D-\x7F]|[\u0080-\u07FF]|[\u0800-\uD7FF]|[\uE000-\uFFFF]"
    r"|[\u{10000}-\u{10FFFF}])"
)


def short_strings_as_patterns(schema: Any) -> Any:
    """``schema`` with every ``{"type": "string", "maxLength": n <= 16}`` (minLength too, without a
    pattern, format, enum or const) written as the equal pattern, and so the strings of the
    LONG_PATTERNS_MAX shortest distinct bounds up to 128; the input is not changed."""
    schema = copy.deepcopy(schema)
    strings = []
    for node, _ in subschemas(schema):
        low, high = node.get("minLength", 0), node.get("maxLength")
        if (
            node.get("type") == "string"
            and _count(high)
            and _count(low)
            and low <= high <= SHORT_STRING_MAX
            and not any(k in node for k in ("pattern", "format", "enum", "const"))
        ):
            strings.append((node, low, high))
    long_bounds = sorted({(high, low) for _, low, high in strings if high > ALWAYS_PATTERN_MAX})
    rewritten = set(long_bounds[:LONG_PATTERNS_MAX])
    for node, low, high in strings:
        if high <= ALWAYS_PATTERN_MAX or (high, low) in rewritten:
            node.pop("minLength", None)
            node.pop("maxLength")
            node["pattern"] = f"^{STRING_CHARACTER}{{{low},{high}}}$"
    return schema


# The classes xgrammar 0.2.8 gives a JSON string's characters (a maxLength string's, an unbounded one's,
# the builtin JSON grammar's): the first lets raw control characters through (not valid JSON), and all
# let the UTF-8 encodings of the surrogates U+D800-U+DFFF through (not valid UTF-8; a byte-level
# tokenizer has a token for each byte); then the class they should be.
_XGRAMMAR_STRING_CHARACTERS = (r"[^\"\\\r\n]", r"[^\0-\x1f\"\\\r\n]", r"[^\"\\\0-\x1f]")
_JSON_STRING_CHARACTER = r"[^\0-\x1f\"\\\uD800-\uDFFF]"
# a quoted literal or an escape pair (both left alone: an enum value may print like a class, and \" starts
# no literal), or one of those classes
_LITERAL_OR_CLASS = re.compile(
    r'"(?:\\.|[^"\\])*"|(' + "|".join(re.escape(c) for c in _XGRAMMAR_STRING_CHARACTERS) + r")|\\.",
    re.DOTALL,
)
_ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|.)", re.DOTALL)


def exact_json_ebnf(ebnf: str) -> str:
    """xgrammar's EBNF of a JSON grammar (``str(Grammar)``) as its parser reads it right (see
    GrammarService._parse), its strings' characters as JSON allows them: each \\xHH escape written as
    \\u00HH, which takes exactly four hex digits, and the string character classes replaced."""
    ebnf = _LITERAL_OR_CLASS.sub(lambda m: _JSON_STRING_CHARACTER if m.group(1) else m.group(), ebnf)
    return _ESCAPE.sub(lambda m: "\\u00" + m.group(1) if m.group(1) else m.group(0), ebnf)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ebnf_literal(text: str) -> str:
    """``text`` as an xgrammar EBNF string literal (its escapes are JSON's)."""
    return json.dumps(text, ensure_ascii=False)


def error_text(error: BaseException) -> str:
    """xgrammar's message without the C++ source location it starts with."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    first = _XGRAMMAR_PREFIX.sub("", lines[0]) if lines else type(error).__name__
    return " ".join([first, *lines[1:2]])[:500]
