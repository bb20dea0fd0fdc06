"""The `pagetron` command: offline generate and chat, serve through Triton, clients, benchmarks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from pagetron.backend.core.config import EngineConfig
from pagetron.backend.core.fields import field_types


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (--max-model-len, --enable-prefix-caching/--no-..., ...)."""
    group = parser.add_argument_group("engine arguments")
    for name, ftype in field_types(EngineConfig).items():
        flag = "--" + name.replace("_", "-")
        if ftype.base is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        elif ftype.base is dict:
            group.add_argument(flag, dest=name, type=_mapping, default=None, metavar="NAME=VALUE,...")
        else:
            metavar = ftype.base.__name__.upper()
            group.add_argument(flag, dest=name, type=ftype.base, default=None, metavar=metavar)


def _mapping(text: str) -> dict[str, str]:
    """A JSON object, or name=value pairs separated by commas (vLLM's --lora-modules name=path)."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON object: {e}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("expected a JSON object")
        return value
    pairs = [p.partition("=") for p in text.split(",") if p.strip()]
    if not pairs or any(not k.strip() or not sep or not v.strip() for k, sep, v in pairs):
        raise argparse.ArgumentTypeError(f"expected name=value[,name=value...], got {text!r}")
    return {k.strip(): v.strip() for k, _, v in pairs}


def engine_args(ns: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=-1)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--sampling-seed", dest="sampling_seed", type=int, default=None)
    group.add_argument("--n", type=int, default=1)
    group.add_argument("--stop", action="append", default=None)
    group.add_argument("--ignore-eos", action="store_true")


def sampling_params(ns: argparse.Namespace):
    from pagetron.backend.core.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        min_p=ns.min_p,
        seed=ns.sampling_seed,
        n=ns.n,
        stop=ns.stop,
        ignore_eos=ns.ignore_eos,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagetron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions for prompts (arguments or JSONL) as JSONL")
    gen.add_argument("prompts", nargs="*", help="prompt texts")
    gen.add_argument(
        "--input", help='JSONL file: {"prompt": ...} or {"messages": [...]}, optional "sampling_params"'
    )
    gen.add_argument("--output", help="write JSONL here instead of stdout")
    gen.add_argument("--chat", action="store_true", help="wrap plain prompts in the chat template")
    add_sampling_args(gen)
    add_engine_args(gen)

    chat = sub.add_parser("chat", help="interactive chat that streams tokens")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--demo", action="store_true", help="answer a few canned questions and exit")
    add_sampling_args(chat)
    add_engine_args(chat)

    serve = sub.add_parser("serve", help="serve a model from the real Triton Inference Server")
    from pagetron.backend.cli.serve import add_serve_arguments

    add_serve_arguments(serve)
    add_engine_args(serve)

    worker = sub.add_parser("worker", help="the tensor-parallel ranks of one more host (multi-host engines)")
    from pagetron.backend.cli.worker import add_worker_arguments

    add_worker_arguments(worker)
    add_engine_args(worker)

    openai = sub.add_parser("openai", help="the OpenAI-compatible API in front of a running Triton server")
    from pagetron.backend.cli.openai import add_openai_arguments

    add_openai_arguments(openai)

    bench = sub.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    bench_sub = bench.add_subparsers(dest="workload", required=True)
    smoke = bench_sub.add_parser("cpu-smoke", help="engine vs HF generate() batch 1, SmolLM2 on CPU")
    smoke.add_argument("--json", dest="json_path", help="write the results as JSON here")
    smoke.add_argument("--num-prompts", type=int, default=32)
    smoke.add_argument("--max-tokens", type=int, default=64)
    add_engine_args(smoke)
    gpu = bench_sub.add_parser("gpu", help="workloads T and P on a GPU, with HF baselines in the same run")
    from pagetron.backend.benchmarks.gpu_workloads import add_arguments as add_gpu_arguments

    add_gpu_arguments(gpu)
    gpu_served = bench_sub.add_parser(
        "gpu-served", help="workload L through tritonserver on a GPU, vs offline"
    )
    from pagetron.backend.benchmarks.gpu_served import add_arguments as add_gpu_served_arguments

    add_gpu_served_arguments(gpu_served)
    overhead = bench_sub.add_parser(
        "openai-overhead", help="chat throughput through the OpenAI frontend vs straight to Triton gRPC"
    )
    from pagetron.backend.benchmarks.openai_overhead import add_arguments as add_overhead_arguments

    add_overhead_arguments(overhead)
    add_engine_args(overhead)
    lora = bench_sub.add_parser("lora", help="requests over 1, 8 and 32 LoRA adapters vs the base model")
    from pagetron.backend.benchmarks.lora_bench import add_arguments as add_lora_arguments

    add_lora_arguments(lora)
    structured = bench_sub.add_parser("structured", help="a JSON-schema workload vs the same unconstrained")
    from pagetron.backend.benchmarks.structured_bench import add_arguments as add_structured_arguments

    add_structured_arguments(structured)
    add_engine_args(structured)
    served = bench_sub.add_parser("served-vs-offline", help="throughput through tritonserver vs offline")
    from pagetron.backend.benchmarks.served_vs_offline import add_arguments as add_served_arguments

    add_served_arguments(served)
    add_engine_args(served)

    from pagetron.client.cli import add_client_commands

    add_client_commands(sub)

    ns = parser.parse_args(argv)
    if hasattr(ns, "func"):
        return ns.func(ns)
    try:
        if ns.command == "generate":
            from pagetron.backend.cli.generate import run_generate

            return run_generate(ns)
        if ns.command == "serve":
            from pagetron.backend.cli.serve import run_serve

            return run_serve(ns)
        if ns.command == "worker":
            from pagetron.backend.cli.worker import run_worker

            return run_worker(ns, engine_args(ns))
        if ns.command == "openai":
            from pagetron.backend.cli.openai import run_openai

            return run_openai(ns)
        if ns.command == "chat":
            from pagetron.backend.cli.chat import run_chat

            return run_chat(ns)
        if ns.workload == "gpu":
            from pagetron.backend.benchmarks.gpu_workloads import run_gpu_bench

            return run_gpu_bench(ns)
        if ns.workload == "gpu-served":
            from pagetron.backend.benchmarks.gpu_served import run_gpu_served

            return run_gpu_served(ns)
        if ns.workload == "openai-overhead":
            from pagetron.backend.benchmarks.openai_overhead import run_openai_overhead

            return run_openai_overhead(ns)
        if ns.workload == "lora":
            from pagetron.backend.benchmarks.lora_bench import run_lora_bench

            return run_lora_bench(ns)
        if ns.workload == "structured":
            from pagetron.backend.benchmarks.structured_bench import run_structured_bench

            return run_structured_bench(ns)
        if ns.workload == "served-vs-offline":
            from pagetron.backend.benchmarks.served_vs_offline import run_served_vs_offline

            return run_served_vs_offline(ns)
        from pagetron.backend.benchmarks.cpu_smoke import run_cpu_smoke

        return run_cpu_smoke(ns)
    except (ValueError, FileNotFoundError) as e:
        print(f"pagetron: error: {e}", file=sys.stderr)
        return 2


def dump_jsonl(rows: list[dict], path: str | None) -> None:
    out = open(path, "w") if path else sys.stdout
    try:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if path:
            out.close()


if __name__ == "__main__":
    sys.exit(main())
