"""`pagetron openai` as a real process on a free port, for the OpenAI API tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pagetron.backend.serving.launcher import free_port

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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_frontend(triton_grpc_url: str, log_path: Path, api_key: str | None = API_KEY) -> Frontend:
    port = free_port()
    command = [sys.executable, "-m", "pagetron.backend.cli", "openai", "--triton-url", triton_grpc_url]
    command += ["--port", str(port)] + (["--api-key", api_key] if api_key else [])
    log = open(log_path, "wb")  # noqa: SIM115 (owned by the process)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    frontend = Frontend(process, port, api_key, log_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pagetron openai exited: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{frontend.root_url}/openapi.json", timeout=2):
                return frontend
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    frontend.stop()
    raise RuntimeError("pagetron openai did not start listening within 60 s")
