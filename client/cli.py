"""`pagetron client`, `probe` and `bench-serving`; backend/cli.py calls add_client_commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_URL = "localhost:8001"


def add_client_commands(subparsers: Any) -> None:
    """Register the client subcommands on `pagetron`'s subparsers; each sets `func(ns) -> exit status`."""
    client = subparsers.add_parser("client", help="send one prompt to a Triton server over gRPC")
    client.add_argument("prompt", help="prompt text")
    client.add_argument("--stream", action="store_true", help="print the text as it is generated")
    client.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC endpoint")
    client.add_argument("--model", default="llm")
    client.add_argument("--max-tokens", type=int, default=None, help="default: the server's")
    client.add_argument("--temperature", type=float, default=None, help="default: the server's; 0 is greedy")
    client.add_argument(
        "--sampling-params", type=json_object, default={}, help="JSON; --max-tokens/--temperature win"
    )
    client.add_argument("--timeout", type=float, default=None, help="seconds for the whole request")
    client.add_argument("--verbose", action="store_true", help="finish reason and token counts to stderr")
    client.set_defaults(func=run_client)

    probe = subparsers.add_parser("probe", help="liveness probe: model ready and one real generated token")
    probe.add_argument("--url", default=DEFAULT_URL, help="Triton gRPC endpoint")
    probe.add_argument("--model", default="llm")
    probe.add_argument("--timeout", type=float, default=10.0, help="seconds for the whole probe")
    probe.set_defaults(func=run_probe)

    bench = subparsers.add_parser("bench-serving", help="serving benchmark, workload L (docs/benchmarks.md)")
    add_bench_serving_args(bench)
    bench.set_defaults(func=run_bench)


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def concurrency_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return values


def client_sampling_params(ns: argparse.Namespace) -> dict[str, Any]:
    params = dict(ns.sampling_params)
    if ns.max_tokens is not None:
        params["max_tokens"] = ns.max_tokens
    if ns.temperature is not None:
        params["temperature"] = ns.temperature
    return params


def run_client(ns: argparse.Namespace) -> int:
    from pagetron.client.errors import TritonRequestError
    from pagetron.client.grpc_client import TritonLLMClient
    from pagetron.client.request import GenerateRequest
    from pagetron.client.response import GenerationResult

    request = GenerateRequest(ns.prompt, client_sampling_params(ns), stream=ns.stream)
    result = GenerationResult()
    try:
        with TritonLLMClient(ns.url, ns.model) as client:
            for chunk in client.generate(request, timeout=ns.timeout):
                result.add(chunk)
                if ns.stream and len(chunk.texts) <= 1:
                    print(chunk.text, end="", flush=True)
    except TritonRequestError as e:
        if ns.stream and any(result.texts):
            print()
        print(f"pagetron client: error: {e}", file=sys.stderr)
        return 1
    if ns.stream and len(result.texts) <= 1:
        print()
    else:
        for i, text in enumerate(result.texts):
            print(f"--- output {i} ---\n{text}" if len(result.texts) > 1 else text)
    if ns.verbose:
        print(
            f"finish_reason={result.finish_reasons} output_tokens={result.num_output_tokens} "
            f"responses={result.num_responses}",
            file=sys.stderr,
        )
    return 0


def run_probe(ns: argparse.Namespace) -> int:
    from pagetron.client.probe import probe

    healthy, reason = probe(ns.url, ns.model, ns.timeout)
    print(reason, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def add_bench_serving_args(parser: argparse.ArgumentParser) -> None:
    from pagetron.client.bench_serving import BenchConfig

    d = BenchConfig()
    p = parser.add_argument
    p("--url", default=d.url, help="Triton gRPC endpoint")
    p("--model", default=d.model)
    p("--concurrency", type=concurrency_list, default=d.concurrency, help="levels, e.g. 1,8,64,256")
    p("--prompt-len", type=int, default=d.prompt_len, help="prompt length in tokens")
    p("--output-len", type=int, default=d.output_len, help="output tokens per request (ignore_eos)")
    p("--token-ids", action="store_true", help="random token-id prompts (input_ids) instead of text")
    p("--vocab-size", type=int, default=d.vocab_size, help="token ids are drawn below this")
    p("--num-requests", type=int, default=None, help="requests per level (default max(8, 4 x concurrency))")
    p("--duration", type=float, default=None, help="seconds per level (no new request starts after)")
    p("--warmup", type=int, default=d.warmup, help="requests sent before the first level")
    p("--seed", type=int, default=d.seed)
    p("--timeout", type=float, default=d.timeout, help="seconds per request")
    p("--sampling-params", type=json_object, default={}, help="JSON merged over the benchmark's defaults")
    p("--json", dest="json_path", default=None, help="write the results as JSON here")


def run_bench(ns: argparse.Namespace) -> int:
    from pagetron.client.bench_serving import BenchConfig, run_bench_serving

    config = BenchConfig(
        url=ns.url,
        model=ns.model,
        concurrency=tuple(ns.concurrency),
        prompt_len=ns.prompt_len,
        output_len=ns.output_len,
        token_ids=ns.token_ids,
        vocab_size=ns.vocab_size,
        num_requests=ns.num_requests,
        duration=ns.duration,
        warmup=ns.warmup,
        seed=ns.seed,
        timeout=ns.timeout,
        sampling_params=dict(ns.sampling_params),
    )
    return run_bench_serving(config, ns.json_path)
