"""The grammar mask fill as `pagetron bench structured --shape llama3-8b` exercises it, without a GPU: the
engine's grammar service (xgrammar, the bundled SmolLM2 tokenizer) under the benchmark's order schema,
``--rows`` identical sequences (the benchmark's prompts are all the same and greedy), and each step's token
the best-scoring allowed one under random scores, as a model with random weights picks it.

  python -m pagetron.backend.benchmarks.mask_fill [--rows 64] [--steps 128] [--model-vocab 128256]
      [--grammar-vocab N] [--short-string-max N] [--seeds 0,1,2] [--tokenizer FOLDER] [--json out.json]

``--grammar-vocab`` overrides the ids the masks cover (default: the engine's choice, the tokenizer's ids;
the model's ``--model-vocab`` to see what a padded vocabulary costs), ``--short-string-max`` the longest
maxLength compiled as a pattern (grammar.SHORT_STRING_MAX). Each seed is one walk (its random scores);
prints the fill time per step (mean, median, the slowest steps with the text before them).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def run(ns: argparse.Namespace) -> dict:
    from pagetron.backend.benchmarks.structured_bench import ORDER_SCHEMA
    from pagetron.backend.core.structured_outputs import StructuredOutputsParams
    from pagetron.backend.engine import grammar
    from pagetron.backend.engine.grammar import GrammarService, fill_bitmasks, grammar_vocab_size

    if ns.short_string_max is not None:
        grammar.SHORT_STRING_MAX = ns.short_string_max
    tokenizer = _tokenizer(ns.tokenizer)
    stop = [tokenizer.eos_token_id]
    vocab = ns.grammar_vocab or grammar_vocab_size(tokenizer, ns.model_vocab, stop)
    service = GrammarService(tokenizer, vocab, stop, compile_timeout_s=120.0)
    started = time.perf_counter()
    states = service.grammars(StructuredOutputsParams(json=ORDER_SCHEMA), ns.rows)
    for state in states:
        state.compiled.result()
    compile_s = time.perf_counter() - started
    rng = np.random.default_rng(ns.seed)
    scores = rng.random(vocab)
    bitmask = np.zeros((ns.rows, -(-vocab // 32)), dtype=np.int32)
    times, tokens = [], []
    for _ in range(ns.steps):
        started = time.perf_counter()
        fill_bitmasks(states, bitmask)
        times.append(time.perf_counter() - started)
        allowed = np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")[:vocab].astype(bool)
        token = int(np.argmax(np.where(allowed, scores + 0.5 * rng.random(vocab), -1.0)))
        tokens.append(token)
        if not all(state.accept(token) for state in states) or states[0].is_terminated():
            break
    service.shutdown()
    ms = np.array(times) * 1e3
    slowest = [(round(float(ms[i]), 2), tokenizer.decode(tokens[:i])[-50:]) for i in np.argsort(-ms)[:5]]
    return {
        "seed": ns.seed, "rows": ns.rows, "model_vocab": ns.model_vocab, "grammar_vocab": vocab,
        "short_string_max": grammar.SHORT_STRING_MAX, "steps": len(times),
        "compile_s": round(compile_s, 2), "fill_ms_mean": round(float(ms.mean()), 3),
        "fill_ms_median": round(float(np.median(ms)), 3), "slowest": slowest,
    }  # fmt: skip


def _tokenizer(path: str | None):
    """A tokenizer folder, or the bundled SmolLM2's (from its GGUF, as the engine loads it)."""
    from pagetron.backend.model.loader.model_files import _override_tokenizer
    from pagetron.backend.model.loader.paths import default_model_path

    return _override_tokenizer(path or str(default_model_path()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--model-vocab", type=int, default=128256, help="the 8B shape's")
    parser.add_argument("--grammar-vocab", type=int, default=None)
    parser.add_argument("--short-string-max", type=int, default=None)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--tokenizer", default=None, help="default: the bundled SmolLM2's")
    parser.add_argument("--json", dest="json_path")
    ns = parser.parse_args(argv)
    results = []
    for seed in (int(s) for s in ns.seeds.split(",")):
        ns.seed = seed
        result = run(ns)
        results.append(result)
        print(
            f"seed {seed}: {result['rows']} rows over {result['grammar_vocab']} ids, "
            f"{result['steps']} steps: "
            f"fill {result['fill_ms_mean']} ms a step on average (median {result['fill_ms_median']}); "
            f"compile {result['compile_s']} s"
        )
        for ms, text in result["slowest"][:3]:
            print(f"  {ms:8.2f} ms after {text!r}")
    if len(results) > 1:
        print(f"mean over seeds: {np.mean([r['fill_ms_mean'] for r in results]):.3f} ms a step")
    if ns.json_path:
        with open(ns.json_path, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
