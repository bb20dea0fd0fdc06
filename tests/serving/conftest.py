"""A real tritonserver serving the bundled SmolLM2 as model `llm` on free loopback ports, torn down by pid."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from grpc_helpers import SERVER_ENGINE_ARGS
from model_factory import make_hf_model
from openai_frontend import Frontend, start_frontend
from pagetron.backend.serving.constants import FAULT_ENV
from pagetron.backend.serving.launcher import TritonServer, free_port, prepare_model_repository
from serve_process import SEEN_RANKS, alive, start_serve, stop_serve


def start_server(
    tmp_dir: Path,
    engine_args: dict | None = None,
    parameters: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    model_control_mode: str = "explicit",
    wait: bool = True,
    models: tuple[str, ...] = ("llm",),
    version_files: dict[str, str] | None = None,
    auto_complete: bool = False,
) -> TritonServer:
    """``version_files``: more files for llm/1/ (e.g. multi_lora.json), name -> text. The prepared
    repository's configs are complete, so Triton's config auto-complete is off unless asked for."""
    parameters = {"drain_grace_s": "3", **(parameters or {})}  # keeps server stops short
    repository = prepare_model_repository(
        tmp_dir / "repo", {**SERVER_ENGINE_ARGS, **(engine_args or {})}, parameters, models=models
    )
    for name, text in (version_files or {}).items():
        (repository / "llm" / "1" / name).write_text(text)
    server = TritonServer(
        repository,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        model_control_mode=model_control_mode,
        models=models,
        exit_timeout_s=5,
        env=env or {},
        log_path=tmp_dir / "tritonserver.log",
        auto_complete=auto_complete,
    )
    server.start()
    if wait:
        try:
            server.wait_ready(timeout_s=240)
        except Exception:
            server.stop()
            print((tmp_dir / "tritonserver.log").read_text()[-5000:])
            raise
    return server


# The session's server: one tritonserver start for most tests. It serves `embed` and, as `llm`, the tiny
# model (the served path does not depend on the weights: served outputs are compared with the offline
# engine on the same model, and HF parity covers SmolLM2's; the supervision test serves SmolLM2 itself),
# with the context the OpenAI tests need (a chat without max_tokens may fill max_model_len). It steps
# asynchronously while the offline references step synchronously, so every served test that compares
# outputs also checks that the two agree. It serves two LoRA adapters named in a multi_lora.json, as
# Triton's vLLM backend does, and more from lora_dir (test_lora_serving.py); requests without lora_name
# run the base model, as before.
SESSION_ENGINE_ARGS = {"max_model_len": 2048, "async_scheduling": True,
                       "enable_lora": True, "max_loras": 2, "max_lora_rank": 8}  # fmt: skip
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def lora_adapters(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """PEFT adapters of the tiny model: `sql` and `chat` are served from the start, `late` is not."""
    from model_factory import make_lora_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {
        "sql": make_lora_adapter(tiny_model_dir, root / "sql", 4, 8, ["q_proj", "v_proj"], seed=1),
        "chat": make_lora_adapter(tiny_model_dir, root / "chat", 8, 16, ALL_PROJECTIONS, seed=2),
        "late": make_lora_adapter(tiny_model_dir, root / "late-source", 2, 4, ["down_proj"], seed=3),
    }


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory) -> Path:
    """The session server's lora_dir: empty at first."""
    return tmp_path_factory.mktemp("lora-dir")


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, tiny_model_dir, lora_adapters, lora_dir):
    engine_args = {**SESSION_ENGINE_ARGS, "model": str(tiny_model_dir), "lora_dir": str(lora_dir)}
    multi_lora = json.dumps({name: str(lora_adapters[name]) for name in ("sql", "chat")})
    # auto-complete on: test_vllm_conformance.py loads a vLLM-backend folder whose config names no tensors
    server = start_server(tmp_path_factory.mktemp("triton"), engine_args, models=("llm", "embed"),
                          version_files={"multi_lora.json": multi_lora}, auto_complete=True)  # fmt: skip
    yield server
    server.stop()
    assert not _alive(server.pid)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64, 4,096 positions) with SmolLM2's tokenizer, for the tests
    that need load, long streams or exact outputs but not SmolLM2's answers: its steps cost a few
    milliseconds, not a hundred, and it loads at once."""
    root = tmp_path_factory.mktemp("tiny-model")
    return make_hf_model(root, "llama", num_kv_heads=2, tie_word_embeddings=False, vocab_size=49152,
                         with_tokenizer=True, max_position_embeddings=4096)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    """The offline engine the tiny servers' outputs are compared with."""
    from pagetron.backend import LLM

    return LLM(str(tiny_model_dir), kv_cache_memory_gb=0.05)


# The limits tests' server (backpressure, preemption storm), also on the tiny model: 4 running requests,
# 4 queued (a fifth waiting one is refused), and 6 KV blocks of 16 tokens, so 4 requests that grow past
# 24 tokens must preempt each other (admission without the growth reservation).
SMALL_ENGINE_ARGS = {"max_num_seqs": 4, "num_kv_blocks": 6, "reserve_kv_for_growth": False}
SMALL_MAX_QUEUED = 4


@pytest.fixture(scope="session")
def small_server(tmp_path_factory, tiny_model_dir):
    engine_args = {**SMALL_ENGINE_ARGS, "model": str(tiny_model_dir)}
    parameters = {"max_queued_requests": str(SMALL_MAX_QUEUED)}
    server = start_server(tmp_path_factory.mktemp("small"), engine_args, parameters)
    yield server
    server.kill()


# The session's `pagetron serve`: tensor parallel 2 on the tiny model, its faults read from a file at each
# load (PAGETRON_FAULT=file:PATH) and a 2 s stall timeout. The HTTP guard tests use it first (their files
# sort first), then the tensor-parallel serving tests, which kill a rank, stall it and end by unloading it.
TP_SERVE_MAX_MODEL_LEN = 2048


@pytest.fixture(scope="session")
def tp_fault_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tp-fault") / "fault"
    path.write_text("")
    return path


@pytest.fixture(scope="session")
def tp_serve(tmp_path_factory, tiny_model_dir, tp_fault_file):
    serve = start_serve(
        tmp_path_factory.mktemp("tp-serve"),
        tiny_model_dir,
        "--tensor-parallel-size", "2", "--max-model-len", str(TP_SERVE_MAX_MODEL_LEN),
        "--stall-timeout-s", "2",
        env={FAULT_ENV: f"file:{tp_fault_file}"},
    )  # fmt: skip
    yield serve
    code = stop_serve(serve)
    assert code == 0, serve.text()[-3000:]
    assert not [pid for pid in SEEN_RANKS if alive(pid)], "a rank outlived serve's SIGTERM"


@dataclass
class OpenAIStack:
    server: TritonServer
    frontend: Frontend


@pytest.fixture(scope="session")
def openai_stack(triton_server, tmp_path_factory):
    """`pagetron openai` (API key required) in front of the session's tritonserver."""
    frontend = start_frontend(triton_server.grpc_url, tmp_path_factory.mktemp("openai") / "frontend.log")
    yield OpenAIStack(triton_server, frontend)
    frontend.stop()


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
