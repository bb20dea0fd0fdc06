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
from pagetron.backend.serving.limits import request_body_limit

# The frontend cannot ask Triton for the served model's max_model_len (the `llm` model's config does not
# carry it), so the body limit's default assumes this context length (SmolLM2's), unless told another.
DEFAULT_MAX_MODEL_LEN = 8192


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
    parser.add_argument(
        "--lora-modules",
        type=_adapter_names,
        default=(),
        metavar="NAME[=PATH],...",
        help="LoRA adapters of the llm model, served as OpenAI models of those names (the paths, if given, "
        "are the server's business and ignored here)",
    )
    parser.add_argument(
        "--resolve-adapters",
        action="store_true",
        help="try any other model name as a LoRA adapter of the llm model, which the server finds by name "
        "in its lora_dir (loaded on first use, then listed under /v1/models)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=None,
        metavar="N",
        help="refuse larger request bodies with 413 before reading them (default: "
        "request_body_limit(--max-model-len), 1 MiB + 128 bytes per token of context)",
    )
    parser.add_argument(
        "--max-request-bytes-in-flight",
        type=_positive_int,
        default=None,
        metavar="N",
        help="refuse a request with 429 when the bodies of the requests being handled would pass this "
        "many bytes together; what bounds the frontend's memory (default: 8 x --max-request-bytes)",
    )
    parser.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=DEFAULT_MAX_MODEL_LEN,
        metavar="TOKENS",
        help="the served model's context length, used only for the default body limit "
        f"(default {DEFAULT_MAX_MODEL_LEN})",
    )
    parser.add_argument("--log-level", default="warning")


def _adapter_names(text: str) -> tuple[str, ...]:
    names = tuple(part.partition("=")[0].strip() for part in text.split(",") if part.strip())
    if not names or not all(names):
        raise argparse.ArgumentTypeError(f"expected NAME[=PATH],..., got {text!r}")
    return names


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def run_openai(ns: argparse.Namespace) -> int:
    import uvicorn

    from pagetron.backend.openai_api.app import IN_FLIGHT_BODIES, FrontendSettings, create_app
    from pagetron.backend.openai_api.triton_gateway import ServedModels

    api_key = ns.api_key if ns.api_key is not None else os.environ.get(OPENAI_API_KEY_ENV) or None
    max_bytes = ns.max_request_bytes or request_body_limit(ns.max_model_len)
    in_flight = ns.max_request_bytes_in_flight or IN_FLIGHT_BODIES * max_bytes
    if in_flight < max_bytes:
        print(
            f"pagetron openai: --max-request-bytes-in-flight {in_flight} is less than one body "
            f"(--max-request-bytes {max_bytes})",
            file=sys.stderr,
        )
        return 2
    settings = FrontendSettings(
        triton_url=ns.triton_url,
        api_key=api_key,
        models=ServedModels(ns.llm_model, ns.embed_model, ns.lora_modules, ns.resolve_adapters),
        max_request_bytes=max_bytes,
        max_request_bytes_in_flight=in_flight,
    )
    print(
        f"pagetron: OpenAI API on http://{ns.host}:{ns.port}/v1 -> Triton {ns.triton_url} "
        f"(models {ns.llm_model!r}, {ns.embed_model!r}; {'API key required' if api_key else 'no API key'}; "
        f"request bodies up to {max_bytes} bytes, {in_flight} in flight)",
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
