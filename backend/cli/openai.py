"""`pagetron openai`: the OpenAI-compatible API (uvicorn) in front of a running Triton server."""

from __future__ import annotations

import argparse
import os
import sys

from pagetron.backend.serving.constants import (
    DEFAULT_GRPC_URL,
    EMBED_MODEL_NAME,
    MODEL_NAME,
    OPENAI_API_KEY_ENV,
)


def add_openai_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--triton-url", default=DEFAULT_GRPC_URL, help="Triton's gRPC address")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${OPENAI_API_KEY_ENV}, else no key)",
    )
    parser.add_argument("--llm-model", default=MODEL_NAME, help="Triton model for completions and chat")
    parser.add_argument("--embed-model", default=EMBED_MODEL_NAME, help="Triton model for embeddings")
    parser.add_argument("--log-level", default="warning")


def run_openai(ns: argparse.Namespace) -> int:
    import uvicorn

    from pagetron.backend.openai_api.app import FrontendSettings, create_app
    from pagetron.backend.openai_api.triton_gateway import ServedModels

    api_key = ns.api_key if ns.api_key is not None else os.environ.get(OPENAI_API_KEY_ENV) or None
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
