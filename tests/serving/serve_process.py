"""`pagetron serve` as a child process on free ports, for the tests that need the whole supervisor (HTTP
guard, self-healing, tensor parallelism): start it, read its log, stop it as an operator would and fail
on anything it left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from grpc_helpers import pids_matching, wait_until
from pagetron.backend.serving.constants import ADMIN_HEADER, ADMIN_KEY_ENV
from pagetron.backend.serving.launcher import free_port, port_holders

ADMIN_KEY = "serve-test-admin-key"  # set, so no key file is shared with other servers


@dataclass
class Serve:
    """A `pagetron serve` child process on free ports; its output goes to ``log_path``."""

    process: subprocess.Popen
    ports: dict[str, int]
    log_path: Path
    _log: object = field(repr=False)

    @property
    def url(self) -> str:  # the public HTTP port: the guard
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {ADMIN_HEADER: ADMIN_KEY}

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def internal_port(self) -> int:
        return int(re.search(r"tritonserver HTTP on 127\.0\.0\.1:(\d+)", self.text()).group(1))

    def tritonserver_pids(self) -> list[int]:
        return pids_matching(f"tritonserver.*--grpc-port={self.ports['grpc']} ")

    def status(self, path: str) -> int:
        try:
            return httpx.get(f"{self.url}{path}", timeout=10).status_code
        except httpx.HTTPError:
            return 0

    def ready(self) -> bool:
        return self.status("/v2/models/llm/ready") == 200

    def model_request(self, action: str) -> int:
        url = f"{self.url}/v2/repository/models/llm/{action}"
        return httpx.post(url, headers=self.admin_headers, timeout=300).status_code


def start_serve(tmp_path: Path, model: Path, *extra: str, env: dict[str, str] | None = None) -> Serve:
    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    cmd = [sys.executable, "-m", "pagetron.backend.cli", "serve",
           "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
           "--metrics-port", str(ports["metrics"]), "--exit-timeout-s", "5", "--drain-grace-s", "2",
           "--model", str(model), "--kv-cache-memory-gb", "0.25", "--max-num-seqs", "8", *extra]  # fmt: skip
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed by stop_serve)
    process = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, ADMIN_KEY_ENV: ADMIN_KEY, **(env or {})},
    )
    serve = Serve(process, ports, log_path, log)
    if not wait_until(lambda: process.poll() is not None or serve.ready(), 240, 0.25) or process.poll():
        stop_serve(serve)
        pytest.fail(f"pagetron serve never became ready:\n{serve.text()[-4000:]}")
    return serve


def stop_serve(serve: Serve) -> int | None:
    """SIGTERM, as an operator stops it; whatever is left afterwards is killed (and reported)."""
    leftovers = []
    try:
        if serve.process.poll() is None:
            serve.process.send_signal(signal.SIGTERM)
            try:
                serve.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(serve.process.pid, signal.SIGKILL)
                serve.process.wait()
        for port in serve.ports.values():
            leftovers += [pid for pid, _ in port_holders(port)]
        leftovers += serve.tritonserver_pids()
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        serve._log.close()
    assert not leftovers, f"left running after serve stopped: {leftovers}"
    return serve.process.returncode


# ---- tensor-parallel ranks ---------------------------------------------------------------------------

RANK_PATTERN = "pagetron.backend.executor.multiproc"
SEEN_RANKS: set[int] = set()  # every rank process a test saw; none may outlive its serve


def alive(pid: int) -> bool:
    """Running, not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def ranks_of(serve: Serve) -> list[int]:
    """The tensor-parallel rank processes (beyond rank 0, the stub) of this serve's model."""
    [stub] = pids_matching(f"repo-{serve.ports['grpc']}/llm")
    ranks = [pid for pid in pids_matching(RANK_PATTERN) if parent(pid) == stub]
    SEEN_RANKS.update(ranks)
    return ranks
