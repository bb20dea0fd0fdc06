"""`pagetron serve --openai`, the README's way to run the OpenAI API: tritonserver serves llm and embed, the
frontend runs beside it (restarted if it dies), and SIGTERM takes everything down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import openai

from grpc_helpers import pids_matching, wait_until
from pagetron.backend.serving.launcher import free_port


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, timeout_s: float) -> bool:
    return wait_until(lambda: healthy(url), timeout_s, interval_s=0.5)


def test_serve_with_the_openai_frontend(tmp_path):
    grpc_port, openai_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "pagetron.backend.cli", "serve", "--openai",
        "--http-port", str(free_port()), "--grpc-port", str(grpc_port), "--metrics-port", str(free_port()),
        "--openai-port", str(openai_port), "--exit-timeout-s", "5", "--drain-grace-s", "2",
        "--kv-cache-memory-gb", "0.25", "--max-num-seqs", "8", "--max-model-len", "2048",
    ]  # fmt: skip
    env = {**os.environ, "PAGETRON_OPENAI_API_KEY": "serve-key"}
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
    serve = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    root = f"http://127.0.0.1:{openai_port}"
    frontend_pattern = f"openai --triton-url 127.0.0.1:{grpc_port}"
    try:
        assert wait_healthy(root, 300), "the OpenAI frontend never became healthy"
        client = openai.OpenAI(base_url=f"{root}/v1", api_key="serve-key", max_retries=0)
        assert sorted(m.id for m in client.models.list().data) == ["embed", "llm"]
        chat = client.chat.completions.create(
            model="llm", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert chat.choices[0].message.content and 0 < chat.usage.completion_tokens <= 4
        assert len(client.embeddings.create(model="embed", input="Hi").data[0].embedding) == 384
        assert "serve-key" not in " ".join(
            open(f"/proc/{p}/cmdline").read() for p in pids_matching(frontend_pattern)
        )

        [frontend] = pids_matching(frontend_pattern)
        os.kill(frontend, signal.SIGKILL)
        assert wait_healthy(root, 60), "the frontend was not restarted"
        assert pids_matching(frontend_pattern) != [frontend]

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(90) == 0
        assert not pids_matching(frontend_pattern)
        assert not pids_matching(f"tritonserver.*--grpc-port={grpc_port}")
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        for pid in pids_matching(frontend_pattern) + pids_matching(f"tritonserver.*--grpc-port={grpc_port}"):
            os.kill(pid, signal.SIGKILL)
        log.seek(0)
        print(log.read()[-3000:])
