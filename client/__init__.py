"""Pagetron clients: gRPC streaming client for the Triton `llm` model, liveness probe, serving benchmark.

tritonclient and grpc are imported when a client is created, so importing this package stays cheap.
"""

from pagetron.client.errors import TritonRequestError
from pagetron.client.grpc_aio_client import AsyncTritonLLMClient
from pagetron.client.grpc_client import TritonLLMClient, complete, generate
from pagetron.client.probe import probe
from pagetron.client.request import GenerateRequest
from pagetron.client.response import GenerationChunk, GenerationResult

__all__ = [
    "AsyncTritonLLMClient",
    "GenerateRequest",
    "GenerationChunk",
    "GenerationResult",
    "TritonLLMClient",
    "TritonRequestError",
    "complete",
    "generate",
    "probe",
]
