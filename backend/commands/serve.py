"""`pagetron serve`: the real tritonserver with model `llm` serving the given (or default) model."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from pagetron.backend.cli import engine_args

MAX_RESTARTS_IN_A_ROW = 5


def run_serve(ns: argparse.Namespace) -> int:
    from pagetron.backend.loader import pagetron_cache_dir
    from pagetron.backend.serving.launcher import TritonServer, prepare_model_repository

    args = engine_args(ns)
    repository = prepare_model_repository(
        pagetron_cache_dir() / "serve" / f"repo-{ns.grpc_port}",
        args,
        {"stall_timeout_s": str(ns.stall_timeout_s), "drain_grace_s": str(ns.drain_grace_s)},
    )
    server = TritonServer(
        repository,
        http_port=ns.http_port,
        grpc_port=ns.grpc_port,
        metrics_port=ns.metrics_port,
        host=ns.host,
        model_control_mode=ns.model_control_mode,
        exit_timeout_s=ns.exit_timeout_s,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"pagetron: starting tritonserver (model repository {repository})", file=sys.stderr, flush=True)
    server.start()
    restarts_in_a_row = 0  # restarts that have not reached READY yet
    try:
        while not stop.is_set():
            while not stop.is_set() and not server.is_ready():
                if server.process.poll() is not None:
                    code = server.process.returncode
                    print(f"pagetron: tritonserver exited with code {code}", file=sys.stderr)
                    if restarts_in_a_row == 0 or restarts_in_a_row >= MAX_RESTARTS_IN_A_ROW:
                        return 1  # a first start that fails is a configuration problem: no retry loop
                    restarts_in_a_row += 1
                    print("pagetron: restarting tritonserver", file=sys.stderr, flush=True)
                    server.kill()
                    server.start()
                stop.wait(0.5)
            if stop.is_set():
                break
            _print_ready(server)
            restarts_in_a_row = 0
            failure = _watch(server, stop)
            if failure is None:
                break
            print(f"pagetron: {failure}; restarting tritonserver", file=sys.stderr, flush=True)
            restarts_in_a_row = 1
            server.kill()
            server.start()
    finally:
        print(
            "pagetron: shutting down (in-flight requests finish or are cancelled)",
            file=sys.stderr,
            flush=True,
        )
        code = server.stop(timeout_s=ns.drain_grace_s + ns.exit_timeout_s + 10)
    return 0 if code in (0, None) or stop.is_set() else code


def _watch(server, stop: threading.Event) -> str | None:
    """Waits while the server runs; returns why it must be restarted, or None once asked to stop.

    NOTE: Triton keeps reporting the model READY after its stub dies, and the streams that were in
    flight never end; only a restart closes them (clients see the connection drop at once). A stub gone
    while the model reports READY twice in a row, half a second apart, is that case; an unload (by an
    admin, or the model's own after a fault) drops readiness first and is left alone. A server that
    exits by itself after it was ready (a crash) is restarted too.
    """
    suspicious = 0
    while not stop.is_set():
        stop.wait(0.5)
        if stop.is_set():
            return None
        if server.process.poll() is not None:
            return f"tritonserver exited with code {server.process.returncode} (in-flight requests failed)"
        stub_gone_while_ready = not server.stub_pids() and server.is_ready()
        suspicious = suspicious + 1 if stub_gone_while_ready else 0
        if suspicious >= 2:
            return (
                "the model's stub process died while the model reported READY "
                "(in-flight requests end with a connection error)"
            )
    return None


def _print_ready(server) -> None:
    print(
        f"""
Pagetron is serving model 'llm' through Triton Inference Server
  HTTP {server.http_url}   gRPC {server.grpc_url}   metrics {server.metrics_url}

  curl -X POST http://{server.http_url}/v2/models/llm/generate \\
       -d '{{"text_input": "The capital of France is", "parameters": {{"max_tokens": 32}}}}'

  pagetron client --url {server.grpc_url} --stream "The capital of France is"

  Model load/unload, shared memory, trace and logging APIs need the header 'admin-key: <key>'
  ({_key_source(server)}).
""",
        flush=True,
    )


def _key_source(server) -> str:
    if server.admin_key_file is not None:
        return f"key generated into {server.admin_key_file}; set PAGETRON_ADMIN_KEY(_FILE) to choose one"
    return "key from PAGETRON_ADMIN_KEY or PAGETRON_ADMIN_KEY_FILE"


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
    parser.add_argument(
        "--drain-grace-s",
        type=float,
        default=20.0,
        help="on Ctrl-C, in-flight requests get this long to finish before they are cancelled",
    )
    parser.add_argument(
        "--stall-timeout-s",
        type=float,
        default=30.0,
        help="an engine that makes no progress this long with work pending is declared dead",
    )
