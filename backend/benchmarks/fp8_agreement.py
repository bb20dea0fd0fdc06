"""How often FP8 weights (quantization="fp8") choose the same greedy tokens as the model's own dtype.

    python -m pagetron.backend.benchmarks.fp8_agreement [--model PATH] [--prompts 16] [--max-tokens 32]
        [--json out.json]

Each chat prompt of the CPU smoke workload is answered greedily by both engines; reported: the share of
prompts whose answers are identical, and the mean share of each answer's tokens generated before the two
first differ (the rest of a diverged answer is a different continuation, not a comparable token).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pagetron.backend.benchmarks.prompts import SMOKE_QUESTIONS


def agreement(model: str | None, num_prompts: int, max_tokens: int, **engine_args) -> dict:
    from pagetron.backend import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    answers = {}
    for name, quantization in (("base", None), ("fp8", "fp8")):
        kwargs = {"quantization": quantization, **engine_args}
        llm = LLM(model, **kwargs) if model else LLM(**kwargs)
        prompts = [
            {"prompt_token_ids": llm.encode_chat([{"role": "user", "content": q}])}
            for q in SMOKE_QUESTIONS[:num_prompts]
        ]
        started = time.perf_counter()
        answers[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        answers[f"{name}_seconds"] = round(time.perf_counter() - started, 2)
        llm.engine.shutdown()
        del llm
    prefixes = [_common_prefix(a, b) / len(a) for a, b in zip(answers["base"], answers["fp8"])]
    return {
        "model": model or "bundled SmolLM2",
        "prompts": num_prompts,
        "max_tokens": max_tokens,
        "identical_answers": round(sum(p == 1.0 for p in prefixes) / len(prefixes), 3),
        "mean_agreeing_prefix": round(sum(prefixes) / len(prefixes), 3),
        "seconds": {"base": answers["base_seconds"], "fp8": answers["fp8_seconds"]},
    }


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", dest="json_path")
    ns = parser.parse_args(argv)
    result = agreement(ns.model, ns.prompts, ns.max_tokens)
    identical, prefix = result["identical_answers"], result["mean_agreeing_prefix"]
    print(
        f"FP8 vs base, {ns.prompts} prompts x {ns.max_tokens} greedy tokens: identical answers "
        f"{100 * identical:.1f}%, mean agreeing prefix {100 * prefix:.1f}%"
    )
    if ns.json_path:
        Path(ns.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
