"""`pagetron serve`: the real tritonserver with model `llm` serving the given (or default) model."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

from pagetron.backend.cli import engine_args

MAX_RESTARTS_IN_A_ROW = 5
FRONTEND_QUICK_EXIT_S = 10.0


def run_serve(ns: argparse.Namespace) -> int:
    from pagetron.backend.model.loader import pagetron_cache_dir
    from pagetron.backend.serving.launcher import (
        EMBED_MODEL_NAME,
        MODEL_NAME,
        TritonServer,
        prepare_model_repository,
    )

    args = engine_args(ns)
    models = (MODEL_NAME, EMBED_MODEL_NAME) if ns.openai or ns.embed else (MODEL_NAME,)
    repository = prepare_model_repository(
        pagetron_cache_dir() / "serve" / f"repo-{ns.grpc_port}",
        args,
        {"stall_timeout_s": str(ns.stall_timeout_s), "drain_grace_s": str(ns.drain_grace_s)},
        models=models,
    )
    server = TritonServer(
        repository,
        models=models,
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
    frontend = OpenAIFrontend(ns, server.grpc_url) if ns.openai else None
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
            if frontend is not None:
                frontend.ensure_running()
            _print_ready(server, frontend)
            restarts_in_a_row = 0
            failure = _watch(server, stop, frontend)
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
        if frontend is not None:  # after the drain, so the frontend relays how its streams ended
            frontend.stop()
    return 0 if code in (0, None) or stop.is_set() else code


class OpenAIFrontend:
    """`pagetron openai` beside the server, as a child process, restarted if it dies. The API key goes
    through the environment, not the command line (which any local user can read)."""

    def __init__(self, ns: argparse.Namespace, triton_url: str) -> None:
        from pagetron.backend.cli.openai import API_KEY_ENV, frontend_command

        self.command = frontend_command(triton_url, ns.openai_port, ns.host)
        self.env = dict(os.environ)
        if ns.api_key:
            self.env[API_KEY_ENV] = ns.api_key
        self.url = f"http://{ns.host}:{ns.openai_port}/v1"
        self.has_key = bool(self.env.get(API_KEY_ENV))
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.backoff_s = 0.5  # doubled before its first use
        self.retry_at: float | None = None

    def ensure_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        now = time.monotonic()
        if self.process is not None:
            if self.retry_at is None:
                # one that dies at once (its port taken, say) is retried ever more slowly, up to a minute
                quick = now - self.started_at < FRONTEND_QUICK_EXIT_S
                delay = min(2 * self.backoff_s, 60.0) if quick else 0.0
                self.backoff_s = delay if quick else 0.5
                self.retry_at = now + delay
                print(
                    f"pagetron: the OpenAI frontend exited ({self.process.returncode}); "
                    f"restarting in {delay:.0f} s",
                    file=sys.stderr,
                )
            if now < self.retry_at:
                return
        self.started_at, self.retry_at = now, None
        # its own session: a terminal's Ctrl-C reaches serve, which stops it after the drain
        self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True)

    def stop(self) -> None:
        from pagetron.backend.cli.openai import stop_frontend

        if self.process is not None:
            stop_frontend(self.process)


def _watch(server, stop: threading.Event, frontend: OpenAIFrontend | None = None) -> str | None:
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
        if frontend is not None:
            frontend.ensure_running()
        orphaned = [m for m in server.models if not server.stub_pids(m) and server.is_ready(m)]
        suspicious = suspicious + 1 if orphaned else 0
        if suspicious >= 2:
            return (
                f"the stub process of model {orphaned[0]!r} died while the model reported READY "
                "(in-flight requests end with a connection error)"
            )
    return None


def _print_ready(server, frontend: OpenAIFrontend | None) -> None:
    models = " and ".join(repr(m) for m in server.models)
    openai = ""
    if frontend is not None:
        key = "-H 'Authorization: Bearer <key>' " if frontend.has_key else ""
        openai = f"""
  OpenAI API {frontend.url}
  curl {frontend.url}/chat/completions {key}-H 'Content-Type: application/json' \\
       -d '{{"model": "llm", "messages": [{{"role": "user", "content": "Hi!"}}]}}'
"""
    print(
        f"""
Pagetron is serving {models} through Triton Inference Server
  HTTP {server.http_url}   gRPC {server.grpc_url}   metrics {server.metrics_url}
{openai}
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
        "--stall-timeout-s",
        type=float,
        default=30.0,
        help="an engine that makes no progress this long with work pending is declared dead",
    )
