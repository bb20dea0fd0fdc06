"""`pagetron openai` as a real process on a free port, for the OpenAI API tests."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pagetron.backend.serving.constants import OPENAI_API_KEY_ENV
from pagetron.backend.serving.launcher import free_port
from pagetron.backend.serving.supervisor import frontend_command, stop_frontend, wait_listening

API_KEY = "test-key-123"


@dataclass
class Frontend:
    process: subprocess.Popen
    port: int
    api_key: str | None
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0, **kwargs)

    def stop(self) -> None:
        stop_frontend(self.process)


def start_frontend(
    triton_grpc_url: str, log_path: Path, api_key: str | None = API_KEY, extra: list[str] | None = None
) -> Frontend:
    port = free_port()
    env = {**os.environ, OPENAI_API_KEY_ENV: api_key or ""}
    log = open(log_path, "wb")  # noqa: SIM115 (owned by the process)
    command = frontend_command(triton_grpc_url, port) + (extra or [])
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    frontend = Frontend(process, port, api_key, log_path)
    if not wait_listening(process, frontend.root_url):
        frontend.stop()
        raise RuntimeError(f"pagetron openai did not start listening: {log_path.read_text()[-3000:]}")
    return frontend
