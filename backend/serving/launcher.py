"""Starts the real tritonserver (from the nvidia-pytriton wheel) with Pagetron's model repository.

The Python-backend stub builds sys.path from the ``python3`` first on PATH (PYTHONPATH is ignored), so
the server runs with this interpreter's bin/ first on PATH; the backend directory holds links to the
wheel's libtriton_python.so, its utils module and the stub that matches this Python version.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pagetron.backend.serving import schema
from pagetron.backend.serving.constants import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    ADMIN_KEY_FILE_ENV,
    BACKEND_NAME,
    DRAIN_DONE_SUFFIX,
    DRAIN_FILE,
    ENGINE_ARGS_FILE,
    MODEL_NAME,
    RESTRICTED_APIS,
    STUB_SITE_ENV,
)

REPO_TEMPLATE = Path(__file__).resolve().parents[2] / "model_repository"


class LaunchError(RuntimeError):
    pass


def pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError("tritonserver is not installed: `pip install --no-deps nvidia-pytriton==0.7.0`")
    return Path(spec.submodule_search_locations[0]) / "tritonserver"


def bundled_libraries() -> Path:
    """The wheel's own shared libraries (libarchive, libcudart, ...), which its binaries find by RPATH."""
    return pytriton_root().parent.parent / "nvidia_pytriton.libs"


def build_backend_dir(dest: Path) -> Path:
    """dest/python/ with the Python backend, its utils and the stub for this interpreter, and
    dest/pagetron/model.py: Pagetron as a Python-based backend, so a model folder written for Triton's
    vLLM backend runs with `backend: "pagetron"` (Triton runs a backend folder's model.py on the Python
    backend)."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": root / "backends/python/libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends/python/triton_python_backend_utils.py",
        "triton_python_backend_stub": root / f"python_backend_stubs/{version}/triton_python_backend_stub",
    }
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        if not source.exists():
            raise LaunchError(f"{source} is missing (no Python {version} stub in this nvidia-pytriton?)")
        target = python_dir / name
        target.unlink(missing_ok=True)
        if name == "libtriton_python.so":
            # a copy: Triton refuses a Python-based backend (below) whose backend library resolves outside
            # the backend directory; its libraries are found through LD_LIBRARY_PATH (bundled_libraries)
            shutil.copy2(source, target)
        else:
            target.symlink_to(source)  # the stub finds its libraries next to the file it links to
    own = dest / BACKEND_NAME
    own.mkdir(exist_ok=True)
    (own / "model.py").write_text((REPO_TEMPLATE / MODEL_NAME / "1" / "model.py").read_text())
    return dest


def stub_python_bin(dest: Path) -> Path:
    """The bin/ whose ``python3`` the stub must find first on PATH.

    The stub embeds the system's libpython3.X, so the stdlib on its sys.path must be the system
    Python's too, and it honours no PYTHONPATH. When this interpreter is not the system one (a pyenv or
    conda build), or when PYTHONPATH or $PAGETRON_STUB_SITE_PACKAGES name folders the stub must see, a
    small venv of the system python3.X is made at ``dest`` whose import path is: those stub folders, then
    PYTHONPATH, then this environment's site-packages. The stub's numpy must be older than 2.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    extra = [p for p in os.environ.get(STUB_SITE_ENV, "").split(os.pathsep) if p]
    extra += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if sys.base_prefix == "/usr" and not extra:
        _check_stub_numpy(_numpy_version_here())
        return Path(sys.executable).parent
    system_python = Path(f"/usr/bin/python{version}")
    if not system_python.exists():
        raise LaunchError(
            f"the Triton Python stub embeds the system libpython{version}; install python{version} and "
            f"python{version}-venv (apt-get install -y python{version} python{version}-venv)"
        )
    site_packages = dest / "lib" / f"python{version}" / "site-packages"
    if not (dest / "bin" / "python3").exists():
        subprocess.run([str(system_python), "-m", "venv", "--without-pip", str(dest)], check=True)
    ours = sysconfig.get_paths()["purelib"]
    lines = [str(Path(p).resolve()) for p in extra] + [f"import site; site.addsitedir({ours!r})"]
    (site_packages / "pagetron-environment.pth").write_text("\n".join(lines) + "\n")
    probe = subprocess.run(  # as the stub will see it: without PYTHONPATH
        [str(dest / "bin" / "python3"), "-c", "import numpy; print(numpy.__version__)"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    _check_stub_numpy(probe.stdout.strip() if probe.returncode == 0 else None)
    return dest / "bin"


def _numpy_version_here() -> str | None:
    try:
        import numpy
    except ImportError:
        return None
    return numpy.__version__


def _check_stub_numpy(version: str | None) -> None:
    if version is None:
        raise LaunchError("the Triton Python stub's environment has no numpy: install numpy<2")
    if int(version.split(".")[0]) >= 2:
        raise LaunchError(
            f"the Triton Python stub would import numpy {version}: Triton 2.51's stub corrupts BYTES "
            f"inputs with numpy 2; install numpy<2, or set {STUB_SITE_ENV} to a folder holding numpy<2"
        )


def prepare_model_repository(
    dest: Path,
    engine_args: dict,
    parameters: dict[str, str] | None = None,
    models: tuple[str, ...] = (MODEL_NAME,),
) -> Path:
    """A copy of the named models of model_repository/ (``llm`` always), whose llm/1/engine_args.json
    holds ``engine_args`` (merged over the template's) and whose llm config.pbtxt gets ``parameters`` and
    the request/response tensors (serving/schema.py), so every config is complete: serve it with
    ``TritonServer(auto_complete=False)``, which saves launching a stub just to ask each model its
    config at every load."""
    if MODEL_NAME not in models:
        raise LaunchError(f"the served repository must hold model {MODEL_NAME!r}; got {models}")
    for model in models:
        if not (REPO_TEMPLATE / model).is_dir():
            raise LaunchError(f"model {model!r} not found in the model repository template {REPO_TEMPLATE}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for model in models:
        shutil.copytree(REPO_TEMPLATE / model, dest / model, ignore=shutil.ignore_patterns("__pycache__"))
    args_file = dest / MODEL_NAME / "1" / ENGINE_ARGS_FILE
    merged = {**json.loads(args_file.read_text()), **engine_args}
    for key in ("model", "tokenizer"):  # the stub runs elsewhere: a relative path must not change meaning
        if isinstance(merged.get(key), str) and Path(merged[key]).exists():
            merged[key] = str(Path(merged[key]).resolve())
    args_file.write_text(json.dumps(merged, indent=2) + "\n")
    config = dest / MODEL_NAME / "config.pbtxt"
    text = config.read_text()
    for key, value in (parameters or {}).items():
        entry = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        lines = [line for line in text.splitlines() if f'key: "{key}"' not in line]
        text = "\n".join(lines) + "\n" + entry + "\n"
    config.write_text(text.rstrip("\n") + "\n" + schema.config_pbtxt())
    return dest


def resolve_admin_key(generated_key_file: Path) -> tuple[str, Path | None]:
    """The admin key from $PAGETRON_ADMIN_KEY, else from the file $PAGETRON_ADMIN_KEY_FILE names, else a
    new random key written (owner-only) to ``generated_key_file``, which is returned with it."""
    key = os.environ.get(ADMIN_KEY_ENV, "").strip()
    if not key and os.environ.get(ADMIN_KEY_FILE_ENV):
        path = Path(os.environ[ADMIN_KEY_FILE_ENV])
        try:
            key = path.read_text().strip()
        except OSError as e:
            raise LaunchError(f"{ADMIN_KEY_FILE_ENV}: cannot read {path}: {e}") from None
        if not key:
            raise LaunchError(f"{ADMIN_KEY_FILE_ENV}: {path} is empty")
    if key:
        if any(c in key for c in ",:= \t\n"):
            raise LaunchError("the admin key may not contain ',', ':', '=' or whitespace")
        return key, None
    key = secrets.token_urlsafe(24)
    generated_key_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(generated_key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, generated_key_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortInUseError(LaunchError):
    pass


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Raises PortInUseError naming every port of ``ports`` (label -> port) that ``host`` cannot bind,
    and the process holding it where /proc tells. Binds as servers do (SO_REUSEADDR), so a port left in
    TIME_WAIT by a server that just stopped counts as free."""
    seen: dict[int, str] = {}
    for label, port in ports.items():
        if port in seen:
            raise PortInUseError(f"{seen[port]} and {label} are the same port, {port}")
        seen[port] = label
    problems = []
    for label, port in ports.items():
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as e:
            if getattr(e, "errno", None) == errno.EADDRINUSE:
                problems.append(f"port {port} for {label} is already in use{port_holder_text(port)}")
            else:
                problems.append(f"cannot bind {host}:{port} for {label}: {e}")
    if problems:
        raise PortInUseError("; ".join(problems))


def listening_socket_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets (IPv4 and IPv6) listening on, or bound to, ``port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN, 07 a socket bound but not listening
            if len(fields) > 9 and fields[3] in ("0A", "07") and int(fields[1].rsplit(":", 1)[1], 16) == port:
                if fields[9] != "0":
                    inodes.add(int(fields[9]))
    return inodes


def _socket_inodes_of(pid: int | str) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, or another user's
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on ``port`` (True where /proc cannot tell)."""
    if not os.path.exists("/proc/net/tcp"):
        return True
    return bool(listening_socket_inodes(port) & _socket_inodes_of(pid))


def port_holders(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes holding a socket listening on ``port``, where /proc shows
    them (another user's processes are not shown)."""
    inodes = listening_socket_inodes(port)
    holders = []
    if not inodes:
        return holders
    for entry in os.listdir("/proc"):
        if entry.isdigit() and inodes & _socket_inodes_of(entry):
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            holders.append(
                (int(entry), _redact(" ".join(cmdline.decode(errors="replace").replace("\0", " ").split())))
            )
    return sorted(holders)


def port_holder_text(port: int) -> str:
    """', by pid N (its command line)' for the holders of ``port``, or '' when none can be seen."""
    holders = port_holders(port)
    if not holders:
        return ""
    shown = ", ".join(f"pid {pid} ({_shorten(cmd)})" for pid, cmd in holders[:3])
    return f", by {shown}" + (f" and {len(holders) - 3} more" if len(holders) > 3 else "")


def _redact(cmdline: str) -> str:
    """A command line without secrets (a tritonserver's carries its admin key)."""
    return re.sub(r"((?:key|token|secret|password)=)[^\s,]+", r"\1***", cmdline, flags=re.IGNORECASE)


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parent_death_signal(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when its parent dies, however it
    dies (SIGKILL, the OOM killer); None where there is no prctl (not Linux).

    NOTE: the kernel's "parent" is the *thread* that started the child: start such children from a
    thread that lives as long as they should (the main thread). The signal is not inherited by the
    child's own children, and it survives exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    parent = os.getpid()

    def preexec() -> None:
        if prctl(
            PR_SET_PDEATHSIG, ctypes.c_ulong(sig), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
        ):
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl took effect: no signal would come
            os.kill(os.getpid(), sig)

    return preexec


STUB_SHM_PREFIX = "triton_python_backend_shm_region_"


def group_processes(pgid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the live (not zombie) processes of process group ``pgid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]  # fields after "(comm)": state ppid pgrp
        if int(pgrp) == pgid and state != "Z":
            found.append((int(entry), argv))
    return found


def stub_shm_regions(pgid: int) -> list[str]:
    """The shared-memory regions (/dev/shm names) of the Python-backend stubs in process group ``pgid``:
    a stub names its region on its command line; a server killed with SIGKILL never unlinks them."""
    return sorted(
        {
            a
            for _, argv in group_processes(pgid)
            for a in argv
            if a.startswith(STUB_SHM_PREFIX) and "/" not in a
        }
    )


def unlink_shm_regions(names: list[str]) -> None:
    for name in names:
        try:
            os.unlink(f"/dev/shm/{name}")
        except OSError:
            pass


@dataclass
class TritonServer:
    """One tritonserver process (in its own process group, so its stubs go down with it)."""

    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    # where the HTTP listener binds, when not ``host``: `pagetron serve` keeps it on loopback behind its
    # HTTP guard (http_guard.py), which takes the public HTTP port
    http_host: str | None = None
    model_control_mode: str = "none"  # "none" or "explicit" (then `models` are loaded at start)
    models: tuple[str, ...] = (MODEL_NAME,)  # those the repository holds; READY means all of them are
    exit_timeout_s: int = 30
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    admin_key: str | None = None  # None: resolve_admin_key() at start
    admin_key_file: Path | None = None  # where a generated key was written
    # the kernel SIGKILLs the server when the process (thread) that started it dies; its stubs are not
    # covered by this (see supervisor.ProcessGroupGuard)
    die_with_parent: bool = True
    # Triton's config auto-complete launches a stub per model load just to ask for its config; off for a
    # repository whose configs are complete (prepare_model_repository's)
    auto_complete: bool = True
    process: subprocess.Popen | None = None

    @classmethod
    def on_free_ports(cls, repository: Path, **kwargs) -> TritonServer:
        return cls(
            repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), **kwargs
        )

    @property
    def http_url(self) -> str:
        return f"{self.http_host or self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that authorize a request to the restricted APIs (model load/unload, shared memory)."""
        assert self.admin_key is not None, "the key is set when the server starts"
        return {ADMIN_HEADER: self.admin_key}

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """The same for gRPC, where Triton expects the header name behind a fixed prefix."""
        assert self.admin_key is not None, "the key is set when the server starts"
        return {f"triton-grpc-protocol-{ADMIN_HEADER}": self.admin_key}

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self, backend_dir: Path) -> list[str]:
        cmd = [
            str(pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.http_host or self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--model-control-mode={self.model_control_mode}",
        ]
        restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}"
        cmd += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        if self.model_control_mode == "explicit":
            cmd += [f"--load-model={model}" for model in self.models]
        if not self.auto_complete:
            cmd.append("--disable-auto-complete-config")
        return cmd

    def start(self) -> TritonServer:
        if self.admin_key is None:
            self.admin_key, self.admin_key_file = resolve_admin_key(self.repository.parent / "admin-key")
        from pagetron.backend.model.loader import pagetron_cache_dir  # here: it imports torch

        backend_dir = build_backend_dir(pagetron_cache_dir() / "triton_backends")
        python_bin = stub_python_bin(pagetron_cache_dir() / "stub_env")
        env = dict(os.environ)
        env["PATH"] = f"{python_bin}{os.pathsep}{env.get('PATH', '')}"
        libraries = [
            str(bundled_libraries()),
            *filter(None, env.get("LD_LIBRARY_PATH", "").split(os.pathsep)),
        ]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries)
        env.update(self.env)
        log = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115 (owned by the process)
        self.process = subprocess.Popen(
            self.command(backend_dir),
            env=env,
            stdout=log or None,
            stderr=subprocess.STDOUT if log else None,
            start_new_session=True,
            preexec_fn=parent_death_signal() if self.die_with_parent else None,
        )
        return self

    def stub_pids(self, model: str | None = None) -> list[int]:
        """Python-backend stub processes in the server's process group (Linux /proc); with ``model``,
        only that model's (its stub's command line names the model's model.py in the repository)."""
        if self.process is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            process_group = int(stat.rsplit(")", 1)[1].split()[2])  # fields after "(comm)": state ppid pgrp
            if process_group != self.process.pid or b"triton_python_backend_stub" not in cmdline:
                continue
            if model is None or f"{self.repository}/{model}/".encode() in cmdline:
                pids.append(int(entry.name))
        return sorted(pids)

    def kill(self) -> None:
        """SIGKILLs the server and its stubs at once: every open stream ends with a connection error."""
        if self.process is None:
            return
        regions = stub_shm_regions(self.process.pid)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        unlink_shm_regions(regions)

    def is_ready(self, model: str | None = MODEL_NAME) -> bool:
        path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LaunchError(f"tritonserver exited with code {self.process.returncode} while starting")
            if all(self.is_ready(model) for model in self.models):
                return
            time.sleep(0.5)
        raise LaunchError(f"models {', '.join(self.models)} were not all ready after {timeout_s:.0f} s")

    def drain(self, timeout_s: float) -> bool:
        """Asks the model to finish or cancel its in-flight requests; True once it reports it is done."""
        drain_file = self.repository / MODEL_NAME / DRAIN_FILE
        drain_file.touch()
        done = Path(f"{drain_file}{DRAIN_DONE_SUFFIX}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process is not None and self.process.poll() is None:
            if done.exists():
                return True
            time.sleep(0.2)
        return done.exists()

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Drains the model, SIGINTs the server (it unloads the model and stops its stub), then SIGKILLs
        whatever is left of its process group."""
        if self.process is None:
            return None
        timeout_s = self.exit_timeout_s + 15 if timeout_s is None else timeout_s
        if self.process.poll() is None and self.is_ready():  # an unloaded model has nothing to drain
            self.drain(timeout_s)
            self.process.send_signal(signal.SIGINT)  # the server only: it stops its stubs itself
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        regions = stub_shm_regions(self.process.pid)  # of stubs left in the group, if any
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = self.process.wait()
        unlink_shm_regions(regions)
        return code
