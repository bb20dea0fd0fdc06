"""`pagetron serve`: the real tritonserver with model `llm` serving the given (or default) model. The
supervision (restarts, the OpenAI frontend, cleanup) is pagetron.backend.serving.supervisor."""

from __future__ import annotations

import argparse
import sys

from pagetron.backend.cli import engine_args
from pagetron.backend.serving import supervisor


def run_serve(ns: argparse.Namespace) -> int:
    from pagetron.backend.serving.launcher import LaunchError

    settings = supervisor.ServeSettings(
        engine_args(ns),
        host=ns.host,
        http_port=ns.http_port,
        grpc_port=ns.grpc_port,
        metrics_port=ns.metrics_port,
        model_control_mode=ns.model_control_mode,
        exit_timeout_s=ns.exit_timeout_s,
        drain_grace_s=ns.drain_grace_s,
        stall_timeout_s=ns.stall_timeout_s,
        embed=ns.embed,
        openai_port=ns.openai_port if ns.openai else None,
        api_key=ns.api_key,
        max_request_bytes=ns.max_request_bytes,
    )
    try:
        return supervisor.serve(settings)
    except LaunchError as e:
        print(f"pagetron: error: {e}", file=sys.stderr, flush=True)
        return 1


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--model-control-mode",
        choices=["none", "explicit"],
        default="explicit",
        help="explicit lets an unhealthy model unload itself, so readiness tells the truth",
    )
    parser.add_argument("--exit-timeout-s", type=int, default=30)
    parser.add_argument("--embed", action="store_true", help="also serve the embedding model 'embed'")
    parser.add_argument(
        "--openai",
        action="store_true",
        help="also run the OpenAI-compatible API (pagetron openai) beside the server; implies --embed",
    )
    parser.add_argument("--openai-port", type=int, default=9000)
    parser.add_argument(
        "--api-key",
        default=None,
        help="with --openai: require 'Authorization: Bearer KEY' (default: $PAGETRON_OPENAI_API_KEY)",
    )
    parser.add_argument(
        "--drain-grace-s",
        type=float,
        default=20.0,
        help="on Ctrl-C, in-flight requests get this long to finish before they are cancelled",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=None,
        metavar="N",
        help="HTTP request bodies over N bytes are refused with 413 before they are read, by the nginx "
        "guard on --http-port (default: 1 MiB + 128 bytes per token of max_model_len)",
    )
    parser.add_argument(
        "--stall-timeout-s",
        type=float,
        default=30.0,
        help="an engine that makes no progress this long with work pending is declared dead",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, got {text!r}")
    return value
