"""Names and formats shared between processes (server, Python-backend stub, launcher, clients, OpenAI
frontend), defined once. No torch here: clients and the frontend import it."""

from __future__ import annotations

import re

MODEL_NAME = "llm"  # the Triton model that generates
EMBED_MODEL_NAME = "embed"  # the Triton model that embeds
DEFAULT_GRPC_URL = "localhost:8001"

# files in the served model repository
ENGINE_ARGS_FILE = "engine_args.json"  # in llm/<version>/: the EngineConfig the model builds
VLLM_MODEL_JSON = "model.json"  # read instead when a vLLM-backend model folder has no ENGINE_ARGS_FILE
MULTI_LORA_JSON = "multi_lora.json"  # the vLLM backend's adapters file beside it: {"name": "PEFT folder"}
BACKEND_NAME = "pagetron"  # the Python-based Triton backend `pagetron serve` installs (config: backend)
DRAIN_FILE = "DRAINING"  # in llm/: created by the launcher before it stops the server
DRAIN_DONE_SUFFIX = ".done"  # DRAIN_FILE + this: created by the model once nothing is in flight
# in llm/: written by the model (JSON: its stub's pid, the reason) just before it unloads itself after an
# engine fault; `pagetron serve` reloads the model only then, never after an operator's own unload
SELF_UNLOAD_FILE = "UNLOADED_AFTER_FAULT"

# environment variables
FAULT_ENV = "PAGETRON_FAULT"  # deliberate engine faults for tests (serving/fault_injection.py)
ADMIN_KEY_ENV = "PAGETRON_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "PAGETRON_ADMIN_KEY_FILE"
OPENAI_API_KEY_ENV = "PAGETRON_OPENAI_API_KEY"
STUB_SITE_ENV = "PAGETRON_STUB_SITE_PACKAGES"  # folders the stub imports from first (os.pathsep-separated)

# Triton APIs that change what the server runs or lets clients map memory: each request to them carries
# ADMIN_HEADER with the admin key (Triton's restricted-API options, on HTTP and gRPC alike)
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = "admin-key"


# NOTE: a gRPC stream delivers only an error's message unless the client sends the triton_grpc_error
# header, and with that header tritonserver 2.51 segfaults after a run of error-ended streams (seen under
# fuzzing). So the model puts the code in the message, "[CODE] message", and pagetron.client reads it back.
class ErrorCode:
    """The codes the models send (Triton's TRITONSERVER_Error names)."""

    INVALID_ARG = "INVALID_ARG"
    UNAVAILABLE = "UNAVAILABLE"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


_TAGGED = re.compile(r"^\[([A-Z_]+)\] (.*)$", re.DOTALL)


def tag_error(message: str, code: str) -> str:
    return f"[{code}] {message}"


def untag_error(text: str) -> tuple[str | None, str]:
    """(code, message) of a tagged error text; (None, text) when it carries no tag."""
    match = _TAGGED.match(text)
    return (None, text) if match is None else (match.group(1), match.group(2))
