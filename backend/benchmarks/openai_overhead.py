"""`pagetron bench openai-overhead`: chat-completion throughput through the OpenAI frontend vs straight to
Triton gRPC (client/bench_openai.py), on a stack it starts (tritonserver + `pagetron openai`) or on
running ones (--triton-url and --openai-url)."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from pagetron.backend.cli import engine_args
from pagetron.backend.serving.supervisor import frontend_command, stop_frontend, wait_listening
from pagetron.client.bench_openai import OverheadConfig, format_overhead, measure_overhead


def _start_frontend(triton_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    from pagetron.backend.serving.launcher import free_port

    port = free_port()
    process = subprocess.Popen(
        frontend_command(triton_url, port), stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    if not wait_listening(process, f"http://127.0.0.1:{port}"):
        process.kill()
        raise RuntimeError(f"the frontend did not start: {log.read_text()[-2000:]}")
    return process, f"http://127.0.0.1:{port}/v1"


def run_openai_overhead(ns: argparse.Namespace) -> int:
    from pagetron.backend.serving.launcher import TritonServer, prepare_model_repository

    config = dict(
        api_key=ns.api_key,
        concurrency=ns.concurrency,
        num_requests=ns.num_requests or 4 * ns.concurrency,
        prompt_len=ns.prompt_len,
        output_len=ns.output_len,
        stream=not ns.no_stream,
        rounds=ns.rounds,
    )
    if ns.triton_url and ns.openai_url:
        result = asyncio.run(measure_overhead(OverheadConfig(ns.triton_url, ns.openai_url, **config)))
    else:
        args = {"max_num_seqs": max(64, ns.concurrency), **engine_args(ns)}
        with tempfile.TemporaryDirectory() as tmp:
            repo = prepare_model_repository(Path(tmp) / "repo", args)
            server = TritonServer.on_free_ports(repo, log_path=Path(tmp) / "server.log").start()
            frontend = None
            try:
                server.wait_ready()
                frontend, openai_url = _start_frontend(server.grpc_url, Path(tmp) / "frontend.log")
                result = asyncio.run(measure_overhead(OverheadConfig(server.grpc_url, openai_url, **config)))
                result["engine_args"] = args
            except Exception:
                log = Path(tmp) / "server.log"
                print(log.read_text()[-4000:] if log.exists() else "(no server log)", file=sys.stderr)
                raise
            finally:
                if frontend is not None:
                    stop_frontend(frontend)
                server.stop()
    print(format_overhead(result))
    if ns.json_path:
        Path(ns.json_path).write_text(json.dumps(result, indent=2) + "\n")
    errors = sum(r["direct"]["num_errors"] + r["frontend"]["num_errors"] for r in result["rounds"])
    return 1 if errors else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=None, help="per run (default 4 x concurrency)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--no-stream", action="store_true", help="non-streaming chat completions")
    parser.add_argument("--rounds", type=int, default=2, help="direct/frontend run pairs")
    parser.add_argument("--triton-url", default=None, help="measure a running stack instead of starting one")
    parser.add_argument("--openai-url", default=None, help="the running frontend's base URL (…/v1)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--json", dest="json_path")
