"""Workload "CPU smoke-perf" (docs/benchmarks.md): engine offline throughput vs HF generate() batch 1."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch

from pagetron.backend.benchmarks.hf_reference import hf_greedy, load_hf_model
from pagetron.backend.benchmarks.prompts import SMOKE_QUESTIONS
from pagetron.backend.cli import engine_args
from pagetron.backend.core.sampling_params import SamplingParams
from pagetron.backend.engine.llm import LLM


def run_cpu_smoke(ns: argparse.Namespace) -> int:
    args = engine_args(ns)
    llm = LLM(**args)
    questions = (SMOKE_QUESTIONS * (ns.num_prompts // len(SMOKE_QUESTIONS) + 1))[: ns.num_prompts]
    prompts = [llm.encode_chat([{"role": "user", "content": q}]) for q in questions]
    # min_tokens masks EOS exactly as HF's min_new_tokens does, so both generate the same full-length text
    params = SamplingParams(temperature=0.0, max_tokens=ns.max_tokens, min_tokens=ns.max_tokens)

    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    engine_s = time.perf_counter() - start
    engine_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)

    hf = load_hf_model(args.get("model"))
    hf_greedy(hf, prompts[0], 4)  # warm-up
    hf_tokens, same = 0, 0
    start = time.perf_counter()
    for prompt, out in zip(prompts, outputs):
        ids = hf_greedy(hf, prompt, ns.max_tokens, min_new_tokens=ns.max_tokens)
        hf_tokens += len(ids)
        same += ids == out.outputs[0].token_ids
    hf_s = time.perf_counter() - start

    result = {
        "workload": "cpu-smoke",
        "model": args.get("model") or "SmolLM2-135M-Instruct (bundled GGUF, fp32)",
        "num_prompts": len(prompts),
        "max_tokens": ns.max_tokens,
        "engine_tokens": engine_tokens,
        "engine_s": round(engine_s, 3),
        "engine_tok_s": round(engine_tokens / engine_s, 2),
        "hf_tokens": hf_tokens,
        "hf_s": round(hf_s, 3),
        "hf_tok_s": round(hf_tokens / hf_s, 2),
        "ratio": round((engine_tokens / engine_s) / (hf_tokens / hf_s), 2),
        "identical_outputs": f"{same}/{len(prompts)}",
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "commit": _git_commit(),
    }
    print(f"{'':24}{'tokens':>8}{'seconds':>10}{'tok/s':>10}")
    print(f"{'pagetron (batched)':24}{engine_tokens:>8}{engine_s:>10.2f}{result['engine_tok_s']:>10.1f}")
    print(f"{'HF generate() batch 1':24}{hf_tokens:>8}{hf_s:>10.2f}{result['hf_tok_s']:>10.1f}")
    print(f"ratio {result['ratio']}x, identical greedy outputs {result['identical_outputs']}")
    if ns.json_path:
        with open(ns.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
