"""`pagetron serve --openai` runs the OpenAI frontend beside tritonserver and restarts it if it dies, and
leaves nothing behind when it is SIGKILLed (the OOM killer, a supervisor's hard stop):
tritonserver, its Python-backend stubs and the OpenAI frontend die with it and its ports go quiet. A
port that is already taken is a clear error at once, naming the port and its holder, never a restart
loop, also when tritonserver itself finds it taken (another process took it after serve's check)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from grpc_helpers import pids_matching, stream_generate, wait_until
from model_factory import FULL_ONLY
from pagetron.backend.model.loader import pagetron_cache_dir
from pagetron.backend.serving.constants import OPENAI_API_KEY_ENV
from pagetron.backend.serving.launcher import (
    TritonServer,
    free_port,
    group_processes,
    port_holders,
    stub_shm_regions,
)
from serve_process import alive

SERVE = [sys.executable, "-m", "pagetron.backend.cli", "serve"]
ENGINE_ARGS = ["--max-model-len", "512", "--kv-cache-memory-gb", "0.25", "--max-num-seqs", "8"]


def serve_command(ports: dict[str, int], openai: bool = False, model: Path | None = None) -> list[str]:
    cmd = SERVE + [
        "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
        "--metrics-port", str(ports["metrics"]), "--exit-timeout-s", "5", "--drain-grace-s", "2",
    ]  # fmt: skip
    if openai:
        cmd += ["--openai", "--openai-port", str(ports["openai"])]
    return cmd + ENGINE_ARGS + (["--model", str(model)] if model is not None else [])


def free_ports() -> dict[str, int]:
    return {name: free_port() for name in ("http", "grpc", "metrics", "openai")}


def processes_with(*markers: str) -> dict[int, str]:
    """Live (not zombie) processes whose command line contains one of ``markers``, but not this one."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z" and any(m in cmdline for m in markers):
            found[int(entry.name)] = cmdline
    return found


def answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def kill_leftovers(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_repository(ports: dict[str, int]) -> None:
    shutil.rmtree(pagetron_cache_dir() / "serve" / f"repo-{ports['grpc']}", ignore_errors=True)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def check_the_frontend(root: str, frontend_pattern: str) -> None:
    client = openai.OpenAI(base_url=f"{root}/v1", api_key="serve-key", max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["embed", "llm"]
    chat = client.chat.completions.create(
        model="llm",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens == 4
    assert len(client.embeddings.create(model="embed", input="Hi").data[0].embedding) == 384
    cmdlines = " ".join(open(f"/proc/{p}/cmdline").read() for p in pids_matching(frontend_pattern))
    assert "serve-key" not in cmdlines  # the key goes through the environment

    [frontend] = pids_matching(frontend_pattern)
    os.kill(frontend, signal.SIGKILL)
    assert wait_until(lambda: healthy(root), 60, 0.5), "the frontend was not restarted"
    assert pids_matching(frontend_pattern) != [frontend]


def test_sigkill_of_serve_takes_server_stubs_and_frontend_down(tmp_path):
    """Serves the default model, SmolLM2 (the other served tests run a tiny one): its known greedy
    continuation is checked end to end here first."""
    ports = free_ports()
    # tritonserver (--model-repository), each stub (its model.py) and serve's guard name the repository
    markers = (f"/serve/repo-{ports['grpc']}/", f"/serve/repo-{ports['grpc']} ",
               f"openai --triton-url 127.0.0.1:{ports['grpc']}")  # fmt: skip
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
    serve = subprocess.Popen(
        serve_command(ports, openai=True),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, OPENAI_API_KEY_ENV: "serve-key"},
    )
    probe = TritonServer(
        tmp_path, http_port=ports["http"], grpc_port=ports["grpc"], metrics_port=ports["metrics"]
    )

    def up() -> bool:
        return serve.poll() is not None or (
            probe.is_ready("llm") and probe.is_ready("embed") and answers(ports["openai"])
        )

    try:
        assert wait_until(up, 300, 0.5) and serve.poll() is None, "pagetron serve never became ready"
        prompt = "Once upon a time, there was a little girl named"
        known = stream_generate(probe.grpc_url, prompt, {"max_tokens": 4, "temperature": 0})
        assert known.error is None and known.text == " Emma who loved to"
        [server] = pids_matching(f"tritonserver.*--grpc-port={ports['grpc']} ")
        processes = processes_with(*markers)
        kinds = sorted(
            "stub" if "triton_python_backend_stub" in c else
            "tritonserver" if "tritonserver" in c else
            "frontend" if "openai --triton-url" in c else
            "guard" if "pagetron-guard" in c else c
            for c in processes.values()
        )  # fmt: skip
        assert kinds == ["frontend", "guard", "stub", "stub", "tritonserver"], processes
        # the HTTP port is nginx's (the HTTP guard: a master and its worker, in a group of their own)
        nginx = dict(port_holders(ports["http"]))
        assert sorted(c.split(" process")[0] for c in nginx.values()) == ["nginx: master", "nginx: worker"]
        assert len({os.getpgid(pid) for pid in nginx}) == 1, nginx

        # a second serve on the same ports: refused at once, naming the port and who holds it, and the
        # first one's model repository (which the second would have rebuilt) is untouched
        second = subprocess.run(serve_command(ports, openai=True), capture_output=True, text=True, timeout=60)
        assert second.returncode != 0, second.stderr
        taken = f"port {ports['http']} for HTTP (--http-port) is already in use, by pid {min(nginx)} (nginx"
        assert taken in second.stderr, second.stderr
        assert "starting tritonserver" not in second.stderr
        assert probe.is_ready("llm") and set(processes_with(*markers)) == set(processes)

        # the frontend answers with the key, never shows it on a command line, and is restarted if it dies
        check_the_frontend(f"http://127.0.0.1:{ports['openai']}", markers[2])

        regions = [Path("/dev/shm", name) for name in stub_shm_regions(server)]
        assert len(regions) == 2

        os.kill(serve.pid, signal.SIGKILL)  # serve alone, as the OOM killer does
        serve.wait()
        killed_at = time.monotonic()
        assert wait_until(
            lambda: (
                not processes_with(*markers)
                and not group_processes(server)
                and not any(alive(pid) for pid in nginx)
                and not any(answers(p) for p in ports.values())
                # the stubs' shared memory (tmpfs, so RAM) too: only a clean stop would unlink it
                and not any(r.exists() for r in regions)
            ),
            10,
            0.05,
        ), (
            f"left after 10 s: {processes_with(*markers)}; "
            f"answering: {[p for p in ports.values() if answers(p)]}; "
            f"shared memory: {[r.name for r in regions if r.exists()]}; "
            f"nginx: {[pid for pid in nginx if alive(pid)]}"
        )
        print(f"everything gone {time.monotonic() - killed_at:.2f} s after the SIGKILL")
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        kill_leftovers(processes_with(*markers))
        kill_leftovers(pid for pid, _ in port_holders(ports["http"]))
        log.seek(0)
        print(log.read()[-3000:])
        log.close()
        remove_repository(ports)


def test_a_taken_port_fails_at_once_naming_the_port_and_its_holder():
    for taken in ("http", "grpc", "metrics", "openai"):
        ports = free_ports()
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", ports[taken]))
            holder.listen()
            started = time.monotonic()
            r = subprocess.run(serve_command(ports, openai=True), capture_output=True, text=True, timeout=60)
            seconds = time.monotonic() - started
        assert r.returncode != 0, (taken, r.stderr)
        assert seconds < 10, (taken, seconds)
        # named: the port, and this process (the one holding it) with its command line
        assert f"port {ports[taken]} for " in r.stderr and f"by pid {os.getpid()} (" in r.stderr, r.stderr
        assert "starting tritonserver" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not pids_matching(f"tritonserver.*--grpc-port={ports['grpc']} ")


@FULL_ONLY  # a second serve start (~10 s); serve's own check is the test above
def test_a_port_taken_while_the_model_loads_is_reported_not_retried(tmp_path, tiny_model_dir):
    """tritonserver loads its models before it binds its ports, so a port taken once it has started
    (after serve's own check) fails its first start: serve names the port and exits, no restart."""
    ports = free_ports()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
    serve = subprocess.Popen(
        serve_command(ports, model=tiny_model_dir),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pattern = f"tritonserver.*--grpc-port={ports['grpc']} "
    holder = socket.socket()
    try:
        assert wait_until(lambda: pids_matching(pattern) or serve.poll() is not None, 60, 0.05)
        assert serve.poll() is None, "serve exited before it started tritonserver"
        holder.bind(("127.0.0.1", ports["grpc"]))  # fails if tritonserver had bound it already
        holder.listen()
        assert serve.wait(180) != 0
        log.seek(0)
        text = log.read()
        taken = f"port {ports['grpc']} for gRPC (--grpc-port) is already in use, by pid {os.getpid()} ("
        assert taken in text, text[-3000:]
        assert text.count("starting tritonserver") == 1 and "restarting" not in text, text[-3000:]
        assert not pids_matching(pattern)
    finally:
        holder.close()
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        kill_leftovers(pids_matching(pattern))
        log.close()
        remove_repository(ports)
