"""What `pagetron serve` runs: tritonserver, restarted when it crashes or its stub dies, and optionally
the OpenAI frontend beside it, restarted when it dies; nothing of it outlives the supervisor.

The frontend is started as a command line (``python -m pagetron.backend.cli openai ...``), so this
module imports nothing from the CLI or the frontend's package.

NOTE: when tritonserver dies by SIGKILL, its Python-backend stubs notice only once its pid is gone:
each stub checks ``kill(parent_pid, 0)`` every 300 ms, and that succeeds while tritonserver is an
unreaped zombie. After the supervisor itself is killed, tritonserver is reaped by init, which may take
seconds (about 2 s on the dev VM) or never happen (a container whose PID 1 does not reap), and the
stubs, which hold the model and its KV cache, keep running. So the supervisor does not rely on them:
a guard process SIGKILLs tritonserver's whole process group (stubs included) the moment the
supervisor dies, and tritonserver and the frontend also get PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pagetron.backend.serving.constants import (
    EMBED_MODEL_NAME,
    MODEL_NAME,
    OPENAI_API_KEY_ENV,
    SELF_UNLOAD_FILE,
)
from pagetron.backend.serving.http_guard import HttpGuard, find_nginx, served_max_model_len
from pagetron.backend.serving.launcher import (
    STUB_SHM_PREFIX,
    PortInUseError,
    TritonServer,
    check_ports_free,
    free_port,
    listens_on,
    parent_death_signal,
    port_holder_text,
    prepare_model_repository,
)
from pagetron.backend.serving.limits import request_body_limit

MAX_RESTARTS_IN_A_ROW = 5
FRONTEND_QUICK_EXIT_S = 10.0
# the body limit's context length when the model's own cannot be read (its load then fails, saying why)
FALLBACK_MAX_MODEL_LEN = 8192


# --- the guard: kills what the supervisor started when the supervisor dies, however it dies ---------

_GUARD_CODE = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    verb, _, pgid = line.partition(" ")
    (groups.add if verb == "watch" else groups.discard)(int(pgid))
# end of file: the supervisor is gone (or it closed the pipe with nothing left registered)
regions = set()
for entry in os.listdir("/proc") if groups else ():
    try:
        stat = open(f"/proc/{entry}/stat").read()
        argv = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except (OSError, ValueError):
        continue
    if int(stat.rsplit(")", 1)[1].split()[2]) in groups:
        regions.update(a for a in argv if a.startswith(sys.argv[1]) and "/" not in a)
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
for name in regions:  # a stub's shared memory, which only a server that stops cleanly unlinks
    try:
        os.unlink("/dev/shm/" + name)
    except OSError:
        pass
"""


class ProcessGroupGuard:
    """A small process of its own that SIGKILLs the process groups registered with it as soon as the
    process that started it dies, however it dies (SIGKILL, the OOM killer): it reads a pipe whose only
    writer is that process, and the kernel closes the pipe when the process ends.

    Unlike PR_SET_PDEATHSIG, this reaches grandchildren (tritonserver's stubs, in its process group).
    It runs in its own session, so a signal to the supervisor's process group does not stop it first.
    """

    def __init__(self, label: str = "") -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _GUARD_CODE, STUB_SHM_PREFIX, "pagetron-guard", label],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _send(self, line: str) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(f"{line}\n".encode())
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError):  # the guard is gone (someone killed it), or closed
            pass

    def watch(self, pgid: int) -> None:
        self._send(f"watch {pgid}")

    def forget(self, pgid: int) -> None:
        """After the group's leader has been reaped: its id may be reused."""
        self._send(f"forget {pgid}")

    def close(self) -> None:
        """Ends the guard; groups still registered are killed."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        self.process.wait()


# --- the OpenAI frontend ------------------------------------------------------------------------------


def frontend_command(
    triton_url: str,
    port: int,
    host: str = "127.0.0.1",
    max_request_bytes: int | None = None,
    adapters: list[str] | None = None,
    resolve_adapters: bool = False,
) -> list[str]:
    """How `pagetron serve --openai`, the benchmark and the tests start the frontend (the API key, if
    any, goes through OPENAI_API_KEY_ENV, never the command line; ``max_request_bytes`` None: the
    frontend's default body limit; ``resolve_adapters``: the server has a lora_dir)."""
    limit = [] if max_request_bytes is None else ["--max-request-bytes", str(max_request_bytes)]
    loras = ["--lora-modules", ",".join(adapters)] if adapters else []
    loras += ["--resolve-adapters"] if resolve_adapters else []
    return [sys.executable, "-m", "pagetron.backend.cli", "openai", "--triton-url", triton_url,
            "--host", host, "--port", str(port), *limit, *loras]  # fmt: skip


def wait_listening(process: subprocess.Popen, root_url: str, timeout_s: float = 60.0) -> bool:
    """True once the frontend at ``root_url`` answers HTTP; False if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{root_url}/openapi.json", timeout=2):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def stop_frontend(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGINT (uvicorn finishes the open responses, then exits); SIGKILL if it is still there after
    ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def openai_frontend(
    settings: ServeSettings, grpc_url: str, guard: ProcessGroupGuard | None = None
) -> OpenAIFrontend | None:
    """The frontend `pagetron serve --openai` runs: the engine's named adapters are models, and with a
    lora_dir any other name is tried as one (--resolve-adapters)."""
    if settings.openai_port is None:
        return None
    return OpenAIFrontend(
        grpc_url, settings.openai_port, settings.host, settings.api_key, guard,
        adapters=list(settings.engine_args.get("lora_modules") or {}),
        resolve_adapters=bool(settings.engine_args.get("lora_dir")),
    )  # fmt: skip


class OpenAIFrontend:
    """`pagetron openai` beside the server, as a child process, restarted if it dies. The API key goes
    through the environment, not the command line (which any local user can read)."""

    def __init__(
        self,
        triton_url: str,
        port: int,
        host: str = "127.0.0.1",
        api_key: str | None = None,
        guard: ProcessGroupGuard | None = None,
        first_retry_s: float = 1.0,
        adapters: list[str] | None = None,
        resolve_adapters: bool = False,
    ) -> None:
        self.command = frontend_command(
            triton_url, port, host, adapters=adapters, resolve_adapters=resolve_adapters
        )
        self.env = dict(os.environ)
        if api_key:
            self.env[OPENAI_API_KEY_ENV] = api_key
        self.port = port
        self.url = f"http://{host}:{port}/v1"
        self.has_key = bool(self.env.get(OPENAI_API_KEY_ENV))
        self.guard = guard
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.first_retry_s = first_retry_s  # after a quick exit; doubled after each one that follows
        self.backoff_s = first_retry_s / 2  # doubled before its first use
        self.retry_at: float | None = None

    def ensure_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        now = time.monotonic()
        if self.process is not None:
            if self.retry_at is None:
                self._forget()
                # one that dies at once (its port taken, say) is retried ever more slowly, up to a minute
                quick = now - self.started_at < FRONTEND_QUICK_EXIT_S
                delay = min(2 * self.backoff_s, 60.0) if quick else 0.0
                self.backoff_s = delay if quick else self.first_retry_s / 2
                self.retry_at = now + delay
                holder = port_holder_text(self.port) if quick else ""
                taken = f"; port {self.port} is in use{holder}" if holder else ""
                print(
                    f"pagetron: the OpenAI frontend exited ({self.process.returncode}){taken}; "
                    f"restarting in {delay:.3g} s",
                    file=sys.stderr,
                )
            if now < self.retry_at:
                return
        self.started_at, self.retry_at = now, None
        # its own session: a terminal's Ctrl-C reaches serve, which stops it after the drain
        self.process = subprocess.Popen(
            self.command, env=self.env, start_new_session=True, preexec_fn=parent_death_signal()
        )
        if self.guard is not None:
            self.guard.watch(self.process.pid)

    def stop(self) -> None:
        if self.process is not None:
            stop_frontend(self.process)
            self._forget()

    def _forget(self) -> None:
        if self.guard is not None and self.process is not None:
            self.guard.forget(self.process.pid)


# --- the supervisor ----------------------------------------------------------------------------------


@dataclass
class ServeSettings:
    """What `pagetron serve` was asked to run."""

    engine_args: dict
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control_mode: str = "explicit"
    exit_timeout_s: int = 30
    drain_grace_s: float = 20.0
    stall_timeout_s: float = 30.0
    embed: bool = False  # also serve model `embed`
    openai_port: int | None = None  # run the OpenAI frontend on this port (implies embed)
    api_key: str | None = None  # the frontend's
    repository_root: Path | None = None  # default: <pagetron cache>/serve
    # the HTTP guard (nginx on http_port) refuses larger bodies with 413; None: request_body_limit() of
    # the served max_model_len (the engine argument, else the model's own context)
    max_request_bytes: int | None = None
    internal_http_port: int | None = None  # tritonserver's own HTTP listener, on loopback; None: a free one
    reload_after_fault: bool = True  # reload `llm` after it unloaded itself (explicit model control only)

    def request_body_limit(self) -> int:
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return request_body_limit(served_max_model_len(self.engine_args) or FALLBACK_MAX_MODEL_LEN)

    @property
    def ports(self) -> dict[str, int]:
        """Every port serve binds, by what it is for (and the flag that sets it)."""
        ports = server_ports(self.http_port, self.grpc_port, self.metrics_port)
        if self.openai_port is not None:
            ports["the OpenAI API (--openai-port)"] = self.openai_port
        return ports

    @property
    def models(self) -> tuple[str, ...]:
        return (MODEL_NAME, EMBED_MODEL_NAME) if self.embed or self.openai_port is not None else (MODEL_NAME,)


def serve(settings: ServeSettings, stop: threading.Event | None = None) -> int:
    """Runs the server (and frontend) until ``stop`` is set or SIGINT/SIGTERM comes; the exit code.

    Raises LaunchError (PortInUseError when a port is taken) for what no restart can fix, before the
    model loads where that can be known then.
    """
    check_ports_free(settings.host, settings.ports)  # before the repository: it may be a running serve's
    find_nginx()  # a missing nginx is an error before anything starts
    root = settings.repository_root
    if root is None:
        from pagetron.backend.model.loader import pagetron_cache_dir

        root = pagetron_cache_dir() / "serve"
    repository = prepare_model_repository(
        root / f"repo-{settings.grpc_port}",
        settings.engine_args,
        {"stall_timeout_s": str(settings.stall_timeout_s), "drain_grace_s": str(settings.drain_grace_s)},
        models=settings.models,
    )
    internal_port = settings.internal_http_port or free_port()
    server = TritonServer(
        repository,
        models=settings.models,
        http_port=internal_port,
        http_host="127.0.0.1",  # behind the guard: only this machine reaches it
        grpc_port=settings.grpc_port,
        metrics_port=settings.metrics_port,
        host=settings.host,
        model_control_mode=settings.model_control_mode,
        exit_timeout_s=settings.exit_timeout_s,
        auto_complete=False,  # prepare_model_repository writes complete configs
    )
    http_guard = HttpGuard(
        settings.host,
        settings.http_port,
        internal_port,
        settings.request_body_limit(),
        root / f"http-guard-{settings.grpc_port}",
    )
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    guard = ProcessGroupGuard(str(repository))
    frontend = openai_frontend(settings, server.grpc_url, guard)
    reload_after_fault = settings.reload_after_fault and settings.model_control_mode == "explicit"
    try:
        return Supervisor(server, guard, stop, frontend, http_guard, reload_after_fault).run(
            drain_timeout_s=settings.drain_grace_s + settings.exit_timeout_s + 10
        )
    finally:
        guard.close()


class Supervisor:
    def __init__(
        self,
        server: TritonServer,
        guard: ProcessGroupGuard,
        stop: threading.Event,
        frontend: OpenAIFrontend | None = None,
        http_guard: HttpGuard | None = None,
        reload_after_fault: bool = False,
    ) -> None:
        self.server, self.guard, self.stop, self.frontend = server, guard, stop, frontend
        self.http_guard = http_guard
        self.reloader = ModelReloader(server) if reload_after_fault else None

    def run(self, drain_timeout_s: float) -> int:
        server, stop, frontend = self.server, self.stop, self.frontend
        if self.http_guard is not None:
            self._start_http_guard()
        print(
            f"pagetron: starting tritonserver (model repository {server.repository})",
            file=sys.stderr,
            flush=True,
        )
        try:
            self._start_server()
        except BaseException:
            self._stop_http_guard()
            raise
        restarts_in_a_row = 0  # restarts that have not reached READY yet
        code = None
        try:
            while not stop.is_set():
                while not stop.is_set() and not self._server_ready():
                    if server.process.poll() is not None:
                        code = server.process.returncode
                        print(f"pagetron: tritonserver exited with code {code}", file=sys.stderr)
                        self._fail_if_a_port_is_taken()
                        if restarts_in_a_row == 0 or restarts_in_a_row >= MAX_RESTARTS_IN_A_ROW:
                            return 1  # a first start that fails is a configuration problem: no retry loop
                        restarts_in_a_row += 1
                        self._restart_server("")
                    stop.wait(0.5)
                if stop.is_set():
                    break
                if frontend is not None:
                    frontend.ensure_running()
                print_ready(server, frontend, self.http_guard)
                restarts_in_a_row = 0
                failure = watch(server, stop, frontend, self._tick)
                if failure is None:
                    break
                restarts_in_a_row = 1
                self._restart_server(f"{failure}; ")
        finally:
            print(
                "pagetron: shutting down (in-flight requests finish or are cancelled)",
                file=sys.stderr,
                flush=True,
            )
            code = server.stop(timeout_s=drain_timeout_s)
            self.guard.forget(server.pid)
            if frontend is not None:  # after the drain, so the frontend relays how its streams ended
                frontend.stop()
            self._stop_http_guard()  # after the drain too, for the same reason
        return 0 if code in (0, None) or stop.is_set() else code

    def _tick(self) -> None:
        """Every half second while the server runs: the HTTP guard is up, a faulted model reloads."""
        if self.http_guard is not None and not self.http_guard.running():
            code = self.http_guard.process.returncode if self.http_guard.process else None
            print(f"pagetron: nginx (the HTTP guard) exited with code {code}; restarting it", file=sys.stderr)
            self.guard.forget(self.http_guard.pid)
            self._start_http_guard()
        if self.reloader is not None:
            self.reloader.check()

    def _start_http_guard(self) -> None:
        http_guard = self.http_guard
        http_guard.start()
        self.guard.watch(http_guard.pid)
        print(
            f"pagetron: HTTP guard (nginx, pid {http_guard.pid}) on {http_guard.host}:{http_guard.port} -> "
            f"tritonserver HTTP on 127.0.0.1:{http_guard.upstream_port}; request bodies up to "
            f"{http_guard.max_body_bytes} bytes",
            file=sys.stderr,
            flush=True,
        )

    def _stop_http_guard(self) -> None:
        if self.http_guard is not None and self.http_guard.process is not None:
            pid = self.http_guard.pid
            self.http_guard.stop()
            self.guard.forget(pid)

    def _start_server(self) -> None:
        self.server.start()
        self.guard.watch(self.server.pid)
        if self.reloader is not None:
            self.reloader.reset()

    def _restart_server(self, why: str) -> None:
        print(f"pagetron: {why}restarting tritonserver", file=sys.stderr, flush=True)
        pid = self.server.pid
        self.server.kill()
        self.guard.forget(pid)
        self._start_server()

    def _server_ready(self) -> bool:
        """READY, from this supervisor's tritonserver: another server on the HTTP port does not count
        (a second serve on a running one's ports would otherwise see that one's readiness)."""
        server = self.server
        return (
            server.process.poll() is None and server.is_ready() and listens_on(server.pid, server.http_port)
        )

    def _fail_if_a_port_is_taken(self) -> None:
        """After tritonserver exited: a port it needs that another process holds (taken after the
        check at start) is the reason; restarting cannot fix it."""
        server = self.server
        try:
            check_ports_free(
                server.host, server_ports(server.http_port, server.grpc_port, server.metrics_port)
            )
        except PortInUseError as e:
            raise PortInUseError(f"tritonserver could not bind its ports: {e}") from None


# --- self-healing: model `llm` reloaded after it unloaded itself --------------------------------------

RELOAD_FIRST_DELAY_S = 1.0
RELOAD_MAX_DELAY_S = 60.0
STUB_EXIT_WAIT_S = 60.0  # how long a reload waits for the faulted stub (and its memory) to go


class ModelReloader:
    """Reloads model `llm` (POST /v2/repository/models/llm/load with the admin key) once it has unloaded
    itself after an engine fault, so readiness comes back without an operator; retries that fail wait
    1, 2, 4 ... s, up to a minute. The model writes SELF_UNLOAD_FILE (its stub's pid, the reason) before
    it unloads itself; an unload without it (an operator's) is left alone.

    ``check()`` runs every half second on the supervisor's thread; the load call itself, which returns
    only once the model is READY or has failed, runs on a thread of its own."""

    def __init__(
        self,
        server: TritonServer,
        first_delay_s: float = RELOAD_FIRST_DELAY_S,
        max_delay_s: float = RELOAD_MAX_DELAY_S,
    ) -> None:
        self.server = server
        self.marker = server.repository / MODEL_NAME / SELF_UNLOAD_FILE
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self.reset()

    def reset(self) -> None:
        """After tritonserver (re)started: it loads the model itself."""
        self.delay_s = self.first_delay_s
        self.retry_at = 0.0
        self.attempts = 0
        self.unloaded_at: float | None = None
        self.thread: threading.Thread | None = None
        self.result: str | None = None  # None: the last load succeeded; else why it failed
        self.was_ready = True
        self.generation = getattr(self, "generation", 0) + 1  # a load thread of an older one is ignored

    def check(self) -> None:
        if self.thread is not None:
            if self.thread.is_alive():
                return
            self.thread = None
            self._loaded()
            return
        ready = self.server.is_ready(MODEL_NAME)
        fault = self._read_marker()
        if fault is None:
            if self.was_ready and not ready and self._server_answers():
                print(
                    f"pagetron: model {MODEL_NAME!r} is not READY and did not unload itself after a fault "
                    "(an operator's unload?): leaving it unloaded",
                    file=sys.stderr,
                    flush=True,
                )
            self.was_ready = ready
            return
        self.was_ready = ready
        stub_alive = fault.get("pid") in self.server.stub_pids(MODEL_NAME)
        if ready:
            if not stub_alive:  # loaded again meanwhile (by an operator): the marker is stale
                self.marker.unlink(missing_ok=True)
            return  # else: it is still unloading
        now = time.monotonic()
        if self.unloaded_at is None:
            self.unloaded_at = now
            print(
                f"pagetron: model {MODEL_NAME!r} unloaded itself after an engine fault "
                f"({fault.get('reason', 'no reason given')}); reloading it",
                file=sys.stderr,
                flush=True,
            )
        if stub_alive and now - self.unloaded_at < STUB_EXIT_WAIT_S:
            return  # the faulted engine still holds its memory (a hung one takes a few seconds to go)
        if now < self.retry_at:
            return
        self.attempts += 1
        print(
            f"pagetron: reloading model {MODEL_NAME!r} (attempt {self.attempts})", file=sys.stderr, flush=True
        )
        generation = self.generation
        self.thread = threading.Thread(target=self._load, args=(generation,), daemon=True, name="reload")
        self.thread.start()

    def _load(self, generation: int) -> None:
        url = f"http://{self.server.http_url}/v2/repository/models/{MODEL_NAME}/load"
        request = urllib.request.Request(url, data=b"{}", method="POST", headers=self.server.admin_headers)
        try:
            with urllib.request.urlopen(request, timeout=3600):
                result = None
        except urllib.error.HTTPError as e:
            result = f"HTTP {e.code}: {e.read().decode(errors='replace')[:500]}"
        except OSError as e:
            result = str(e)
        if generation == self.generation:
            self.result = result

    def _loaded(self) -> None:
        now = time.monotonic()
        if self.result is None:
            since = f" {now - self.unloaded_at:.1f} s after it unloaded itself" if self.unloaded_at else ""
            print(
                f"pagetron: model {MODEL_NAME!r} reloaded and READY again{since} (attempt {self.attempts})",
                file=sys.stderr,
                flush=True,
            )
            self.marker.unlink(missing_ok=True)
            self.reset()
            return
        print(
            f"pagetron: reloading model {MODEL_NAME!r} failed ({self.result}); "
            f"next attempt in {self.delay_s:.3g} s",
            file=sys.stderr,
            flush=True,
        )
        self.retry_at = now + self.delay_s
        self.delay_s = min(2 * self.delay_s, self.max_delay_s)

    def _read_marker(self) -> dict | None:
        try:
            fault = json.loads(self.marker.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            fault = {}
        return fault if isinstance(fault, dict) else {}

    def _server_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.server.http_url}/v2/health/live", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False


def server_ports(http: int, grpc: int, metrics: int) -> dict[str, int]:
    return {"HTTP (--http-port)": http, "gRPC (--grpc-port)": grpc, "metrics (--metrics-port)": metrics}


def watch(
    server: TritonServer,
    stop: threading.Event,
    frontend: OpenAIFrontend | None = None,
    tick: Callable[[], None] | None = None,
) -> str | None:
    """Waits while the server runs; returns why it must be restarted, or None once asked to stop.

    NOTE: Triton keeps reporting the model READY after its stub dies, and the streams that were in
    flight never end; only a restart closes them (clients see the connection drop at once). A stub gone
    while the model reports READY twice in a row, half a second apart, is that case; an unload (by an
    admin, or the model's own after a fault) drops readiness first and is left alone. A server that
    exits by itself after it was ready (a crash) is restarted too.
    """
    suspicious = 0
    while not stop.is_set():
        stop.wait(0.5)
        if stop.is_set():
            return None
        if server.process.poll() is not None:
            return f"tritonserver exited with code {server.process.returncode} (in-flight requests failed)"
        if frontend is not None:
            frontend.ensure_running()
        if tick is not None:
            tick()
        orphaned = [m for m in server.models if not server.stub_pids(m) and server.is_ready(m)]
        suspicious = suspicious + 1 if orphaned else 0
        if suspicious >= 2:
            return (
                f"the stub process of model {orphaned[0]!r} died while the model reported READY "
                "(in-flight requests end with a connection error)"
            )
    return None


def print_ready(
    server: TritonServer, frontend: OpenAIFrontend | None, http_guard: HttpGuard | None = None
) -> None:
    models = " and ".join(repr(m) for m in server.models)
    openai = ""
    if frontend is not None:
        key = "-H 'Authorization: Bearer <key>' " if frontend.has_key else ""
        openai = f"""
  OpenAI API {frontend.url}
  curl {frontend.url}/chat/completions {key}-H 'Content-Type: application/json' \\
       -d '{{"model": "llm", "messages": [{{"role": "user", "content": "Hi!"}}]}}'
"""
    http_url = server.http_url if http_guard is None else f"{http_guard.host}:{http_guard.port}"
    print(
        f"""
Pagetron is serving {models} through Triton Inference Server
  HTTP {http_url}   gRPC {server.grpc_url}   metrics {server.metrics_url}
{openai}
  curl -X POST http://{http_url}/v2/models/llm/generate \\
       -d '{{"text_input": "The capital of France is", "parameters": {{"max_tokens": 32}}}}'

  pagetron client --url {server.grpc_url} --stream "The capital of France is"

  Model load/unload, shared memory, trace and logging APIs need the header 'admin-key: <key>'
  ({_key_source(server)}).
""",
        flush=True,
    )


def _key_source(server: TritonServer) -> str:
    if server.admin_key_file is not None:
        return f"key generated into {server.admin_key_file}; set PAGETRON_ADMIN_KEY(_FILE) to choose one"
    return "key from PAGETRON_ADMIN_KEY or PAGETRON_ADMIN_KEY_FILE"
