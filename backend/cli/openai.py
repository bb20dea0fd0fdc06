"""`pagetron openai`: the OpenAI-compatible API (uvicorn) in front of a running Triton server."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request

API_KEY_ENV = "PAGETRON_OPENAI_API_KEY"


def frontend_command(triton_url: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """How `pagetron serve --openai`, the benchmark and the tests start the frontend (the API key, if
    any, goes through API_KEY_ENV, never the command line)."""
    return [sys.executable, "-m", "pagetron.backend.cli", "openai", "--triton-url", triton_url,
            "--host", host, "--port", str(port)]  # fmt: skip


def wait_listening(process: subprocess.Popen, root_url: str, timeout_s: float = 60.0) -> bool:
    """True once the frontend at ``root_url`` answers HTTP; False if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{root_url}/openapi.json", timeout=2):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def stop_frontend(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGINT (uvicorn finishes the open responses, then exits); SIGKILL if it is still there after
    ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def add_openai_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--triton-url", default="localhost:8001", help="Triton's gRPC address")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else no key)",
    )
    parser.add_argument("--llm-model", default="llm", help="Triton model for completions and chat")
    parser.add_argument("--embed-model", default="embed", help="Triton model for embeddings")
    parser.add_argument("--log-level", default="warning")


def run_openai(ns: argparse.Namespace) -> int:
    import uvicorn

    from pagetron.backend.openai_api.app import FrontendSettings, create_app
    from pagetron.backend.openai_api.triton_gateway import ServedModels

    api_key = ns.api_key if ns.api_key is not None else os.environ.get(API_KEY_ENV) or None
    settings = FrontendSettings(
        triton_url=ns.triton_url, api_key=api_key, models=ServedModels(ns.llm_model, ns.embed_model)
    )
    print(
        f"pagetron: OpenAI API on http://{ns.host}:{ns.port}/v1 -> Triton {ns.triton_url} "
        f"(models {ns.llm_model!r}, {ns.embed_model!r}; {'API key required' if api_key else 'no API key'})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        create_app(settings),
        host=ns.host,
        port=ns.port,
        log_level=ns.log_level,
        access_log=False,
        loop="auto",
        http="auto",
    )
    return 0
