"""What serving through Triton costs: the same closed-loop workload offline (LLM.generate with
max_num_seqs = C) and through tritonserver over gRPC streaming at concurrency C, same prompts."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from pathlib import Path

from pagetron.backend.cli import engine_args
from pagetron.client.bench_serving import BenchConfig, run_benchmark


def offline_level(args: dict, config: BenchConfig, concurrency: int) -> dict:
    from pagetron.backend.core.sampling_params import SamplingParams
    from pagetron.backend.engine.llm import LLM

    llm = LLM(**{**args, "max_num_seqs": concurrency})
    count = config.requests_for(concurrency)
    prompts = [{"prompt_token_ids": config.make_request(concurrency, i).prompt} for i in range(count)]
    params = SamplingParams(temperature=0.0, max_tokens=config.output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()
    return {
        "output_tokens": tokens,
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(tokens / seconds, 2),
    }


def run_served_vs_offline(ns: argparse.Namespace) -> int:
    from pagetron.backend.serving.launcher import TritonServer, prepare_model_repository

    args = engine_args(ns)
    levels = tuple(int(c) for c in ns.concurrency.split(","))
    config = BenchConfig(
        concurrency=levels,
        prompt_len=ns.prompt_len,
        output_len=ns.output_len,
        token_ids=True,
        vocab_size=49152,
        num_requests=None,
    )
    offline = {c: offline_level(args, config, c) for c in levels}
    with tempfile.TemporaryDirectory() as tmp:
        repo = prepare_model_repository(Path(tmp) / "repo", {**args, "max_num_seqs": max(levels)})
        server = TritonServer.on_free_ports(repo, log_path=Path(tmp) / "server.log").start()
        try:
            server.wait_ready()
            served = asyncio.run(run_benchmark(BenchConfig(**{**config.__dict__, "url": server.grpc_url})))
        finally:
            server.stop()
    rows = []
    for level in served["levels"]:
        c = level["concurrency"]
        ratio = level["output_tokens_per_s"] / offline[c]["output_tokens_per_s"]
        rows.append(
            {
                "concurrency": c,
                "offline_output_tok_s": offline[c]["output_tokens_per_s"],
                "served_output_tok_s": level["output_tokens_per_s"],
                "served_over_offline": round(ratio, 3),
                "serving_cost_pct": round(100 * (1 - ratio), 1),
                "served_errors": level["num_errors"],
                "served_ttft_ms_p50": level["ttft_ms_p50"],
                "served_itl_ms_p50": level["itl_ms_p50"],
            }
        )
    print(f"{'concurrency':>12}{'offline tok/s':>15}{'served tok/s':>14}{'served/offline':>16}")
    for r in rows:
        print(
            f"{r['concurrency']:>12}{r['offline_output_tok_s']:>15.1f}{r['served_output_tok_s']:>14.1f}"
            f"{r['served_over_offline']:>16.3f}"
        )
    result = {
        "workload": "served-vs-offline",
        "prompt_len": ns.prompt_len,
        "output_len": ns.output_len,
        "engine_args": args,
        "levels": rows,
    }
    if ns.json_path:
        Path(ns.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if any(r["served_errors"] for r in rows) else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--json", dest="json_path")
