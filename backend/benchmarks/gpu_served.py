"""Workload L (docs/benchmarks.md) on a GPU: the dummy-weight model served from the real tritonserver,
closed-loop gRPC streaming at each concurrency (prompt 512 tokens, 256 output tokens), then the same
closed loop offline at the highest concurrency, to show what serving costs.

  pagetron bench gpu-served --shape llama2-13b --concurrency 1,8,64,256 --json result.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from pagetron.backend.benchmarks.gpu_workloads import SHAPES, write_config
from pagetron.backend.benchmarks.roofline import Ceilings, ModelShape, Request, engine_floor, measure_ceilings
from pagetron.backend.benchmarks.served_vs_offline import offline_level
from pagetron.client.bench_serving import BenchConfig, run_benchmark
from pagetron.client.bench_stats import format_table


def requests_for(concurrency: int) -> int:
    return max(4, 2 * concurrency)


def serve_levels(engine_args: dict, config: BenchConfig, log_dir: Path) -> tuple[list[dict], float]:
    from pagetron.backend.serving.launcher import TritonServer, prepare_model_repository

    repo = prepare_model_repository(log_dir / "repo", engine_args)
    server = TritonServer.on_free_ports(repo, log_path=log_dir / "server.log")
    started = time.perf_counter()
    server.start()
    levels = []
    try:
        server.wait_ready(timeout_s=900)
        startup_s = time.perf_counter() - started
        print(f"server ready after {startup_s:.1f} s", flush=True)
        for i, concurrency in enumerate(config.concurrency):
            level_config = replace(
                config,
                url=server.grpc_url,
                concurrency=(concurrency,),
                num_requests=requests_for(concurrency),
                warmup=1 if i == 0 else 0,
            )
            result = asyncio.run(run_benchmark(level_config))
            levels += result["levels"]
            print(format_table(levels[-1:]), flush=True)
    finally:
        server.stop()
    return levels, startup_s


def add_floor(
    level: dict,
    shape: ModelShape,
    ceilings: Ceilings,
    engine_args: dict,
    config: BenchConfig,
    concurrency: int | None = None,
) -> None:
    """The level's floor: its requests run at most ``concurrency`` at a time (the closed loop's bound)."""
    concurrency = concurrency or level["concurrency"]
    requests = [Request(config.prompt_len, config.output_len)] * requests_for(concurrency)
    floor = engine_floor(shape, requests, ceilings, {**engine_args, "max_num_seqs": concurrency})
    level["floor_output_tokens_per_s"] = round(floor.output_tok_s, 1)
    level["fraction_of_floor"] = round(level["output_tokens_per_s"] / floor.output_tok_s, 3)
    # one stream's time per output token at the floor (its decode steps hold `concurrency` rows)
    level["floor_ms_per_token_per_stream"] = round(1e3 * concurrency / floor.output_tok_s, 3)


def run_gpu_served(ns: argparse.Namespace) -> int:
    import torch

    tmp = Path(tempfile.mkdtemp())
    folder = write_config(ns.shape, tmp / ns.shape)
    engine_args = {
        "model": str(folder),
        "load_format": "dummy",
        "max_num_seqs": max(256, max(int(c) for c in ns.concurrency.split(","))),
        "max_num_batched_tokens": ns.max_num_batched_tokens,
        **json.loads(ns.engine_args),
    }
    config = BenchConfig(
        concurrency=tuple(int(c) for c in ns.concurrency.split(",")),
        prompt_len=ns.prompt_len,
        output_len=ns.output_len,
        token_ids=True,
        vocab_size=SHAPES[ns.shape]["vocab_size"],
    )
    ceilings = measure_ceilings() if torch.cuda.is_available() else None  # before the server takes the card
    torch.cuda.empty_cache()
    served, startup_s = serve_levels(engine_args, config, tmp)
    if ceilings is not None:
        shape = ModelShape.from_hf_config(SHAPES[ns.shape])
        for level in served:
            add_floor(level, shape, ceilings, engine_args, config)
    top = max(config.concurrency)
    offline = offline_level(engine_args, replace(config, num_requests=requests_for(top)), top)
    served_top = next(level for level in served if level["concurrency"] == top)
    if ceilings is not None:
        add_floor(offline, shape, ceilings, {**engine_args, "max_num_seqs": top}, config, top)
    result = {
        "workload": "L",
        "ceilings": asdict(ceilings) if ceilings else None,
        "shape": ns.shape,
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
        "engine_args": {k: v for k, v in engine_args.items() if k != "model"},
        "server_startup_s": round(startup_s, 1),
        "levels": served,
        "offline_at_top_concurrency": offline,
        "served_over_offline": round(served_top["output_tokens_per_s"] / offline["output_tokens_per_s"], 3),
    }
    print(format_table(served))
    print(
        f"concurrency {top}: served {served_top['output_tokens_per_s']:.1f} vs offline "
        f"{offline['output_tokens_per_s']:.1f} output tok/s = {result['served_over_offline']:.3f}; "
        f"server start-up {startup_s:.1f} s"
    )
    if ns.json_path:
        Path(ns.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if any(level["num_errors"] for level in served) else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-13b")
    parser.add_argument("--concurrency", default="1,8,64,256")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=1024,
        help="the served engine's per-step token budget (smaller: lower inter-token latency under load)",
    )
    parser.add_argument("--engine-args", default="{}", help="JSON merged over the served engine's arguments")
    parser.add_argument("--json", dest="json_path")


if __name__ == "__main__":
    _parser = argparse.ArgumentParser()
    add_arguments(_parser)
    raise SystemExit(run_gpu_served(_parser.parse_args()))
