"""The HTTP guard: nginx on the public HTTP port, in front of tritonserver's own HTTP listener, which
`pagetron serve` binds to an internal loopback port.

NOTE (measured on tritonserver 2.51, the nvidia-pytriton 0.7.0 wheel): a request body of about 4.18 MB
or more (4,180,000 bytes is answered, 4,190,000 is not) whose Content-Type starts with
``application/x-www-form-urlencoded`` (what curl -d sends by default; any case, any parameters,
leading spaces) segfaults the whole server (exit -11), on every HTTP path: unknown models, health, the
restricted repository API before the admin key is checked. libevhtp parses such a body as a query
string before Triton sees the request. Not affected, even at 512 MB: the same body as
application/json, text/plain, multipart/form-data or without a Content-Type, a chunked body, a URL
that has a query string, and a second Content-Type header after another one (evhtp reads the first).
Upstream: triton-inference-server/server#5840; 2.51 has no option to cap a body.

So the guard (1) refuses a body over the limit with 413 before reading it (its Content-Length; a
chunked body as it streams, cut at the limit), (2) sends Triton every request with a form Content-Type
as application/json (Triton's HTTP API reads JSON bodies whatever the header says) and at most one
Content-Type header, and (3) passes everything else through unchanged: paths, the admin-key header,
health, responses; generate_stream's server-sent events leave event by event (no proxy buffering).
The metrics and gRPC ports are not proxied.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pagetron.backend.serving.launcher import LaunchError, listens_on, parent_death_signal

NGINX_PACKAGE = "nginx"  # the Debian/Ubuntu package that installs /usr/sbin/nginx
FORM_CONTENT_TYPE = "x-www-form-urlencoded"
# nginx stops its workers after the open requests end on SIGQUIT; this long, then SIGKILL
STOP_GRACE_S = 10.0


def find_nginx() -> str:
    """The nginx binary (also in /usr/sbin, which a non-root PATH often lacks)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    found = shutil.which("nginx", path=path)
    if found is None:
        raise LaunchError(
            "`pagetron serve` puts nginx in front of tritonserver's HTTP port (it caps request bodies, "
            f"which Triton 2.51 cannot), but nginx is not installed: apt-get install {NGINX_PACKAGE} "
            "(make setup installs it)"
        )
    return found


def served_max_model_len(engine_args: dict) -> int | None:
    """The max_model_len the engine will run with: the engine argument, else the model's own context
    (capped at its sliding window, as the engine caps it), read from its config.json or GGUF metadata
    without loading a tokenizer or converting anything; None when the model cannot be read (its load
    then fails and says why)."""
    if engine_args.get("max_model_len"):
        return int(engine_args["max_model_len"])
    from pagetron.backend.model.loader import ModelLoadError, default_model_path, normalize_hf_config
    from pagetron.backend.model.loader.model_files import _resolve  # how the engine picks HF vs GGUF
    from pagetron.backend.model.model_config import ModelConfig

    try:
        path = Path(engine_args.get("model") or default_model_path()).expanduser()
        kind, path = _resolve(path, engine_args.get("load_format") or "auto")
        if kind == "gguf":
            import gguf

            from pagetron.backend.model.loader.gguf_config import GGUFMetadata

            meta = GGUFMetadata(gguf.GGUFReader(path), path)
            length, window = meta.require("context_length"), meta.arch_value("attention.sliding_window")
        else:
            raw = json.loads((path / "config.json").read_text())
            config = ModelConfig.from_hf_config(normalize_hf_config(raw, str(path / "config.json")))
            length, window = config.max_position_embeddings, config.sliding_window
    except (ModelLoadError, OSError, ValueError, KeyError, TypeError):
        return None
    return int(min(length, window) if window else length)


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _open_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else 65536
    return max(min(limit, 65536), soft if soft != resource.RLIM_INFINITY else 1024)


def nginx_config(
    listen_host: str, listen_port: int, upstream_port: int, max_body_bytes: int, workdir: Path
) -> str:
    """The whole nginx.conf of the guard (nothing from /etc/nginx is read)."""
    nofile = _open_file_limit()
    user = ""
    if os.geteuid() == 0:  # root's workers would run as `nobody`, which cannot reach a root-owned workdir
        import grp
        import pwd

        user = f"user {pwd.getpwuid(0).pw_name} {grp.getgrgid(0).gr_name};"
    temp = {name: workdir / "tmp" / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    too_large = (
        f'{{"error":"the request body is larger than {max_body_bytes} bytes, the limit of this server '
        f'(pagetron serve --max-request-bytes)"}}'
    )
    return f"""# written by `pagetron serve` (backend/serving/http_guard.py); rewritten at every start
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {workdir / "nginx.pid"};
error_log stderr crit;  # not each refused body ("client intended to send too large body")
{user}

events {{
    worker_connections {max(512, nofile // 2)};
}}

http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};

    # Triton 2.51 segfaults on a large form-urlencoded body (see http_guard.py): never send it that type
    map $http_content_type $pagetron_content_type {{
        default $http_content_type;
        "~*{FORM_CONTENT_TYPE}" "application/json";
    }}

    # NOTE: no keepalive to Triton: on SIGINT tritonserver waits (up to its exit timeout) while any HTTP
    # connection is open, and a pool of idle ones made every stop take the whole timeout. A new loopback
    # connection per request costs well under a millisecond.
    upstream tritonserver {{
        server 127.0.0.1:{upstream_port};
    }}

    server {{
        listen {_listen_address(listen_host, listen_port)};
        client_max_body_size {max_body_bytes};
        client_body_buffer_size 1m;
        large_client_header_buffers 4 32k;
        underscores_in_headers on;
        keepalive_requests 100000;
        send_timeout 3600s;

        location / {{
            proxy_pass http://tritonserver;
            proxy_http_version 1.1;
            proxy_set_header Connection close;
            proxy_set_header Host $http_host;
            proxy_set_header Content-Type $pagetron_content_type;
            proxy_buffering off;
            proxy_read_timeout 86400s;
            proxy_send_timeout 3600s;
        }}

        error_page 413 @too_large;
        location @too_large {{
            default_type application/json;
            return 413 '{too_large}';
        }}
        error_page 502 504 @unavailable;
        location @unavailable {{
            default_type application/json;
            return 503 '{{"error":"tritonserver is not running (starting or restarting)"}}';
        }}
    }}
}}
"""


@dataclass
class HttpGuard:
    """nginx on ``host:port`` in front of tritonserver's HTTP listener on 127.0.0.1:``upstream_port``.

    Its master runs in a process group of its own (its workers too) with PR_SET_PDEATHSIG: register
    ``pid`` with the supervisor's ProcessGroupGuard, which kills the whole group when serve dies."""

    host: str
    port: int
    upstream_port: int
    max_body_bytes: int
    workdir: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def config_path(self) -> Path:
        return self.workdir / "nginx.conf"

    def start(self, timeout_s: float = 15.0) -> HttpGuard:
        """Starts nginx and waits until it listens; LaunchError if it cannot."""
        binary = find_nginx()
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.workdir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            nginx_config(self.host, self.port, self.upstream_port, self.max_body_bytes, self.workdir)
        )
        # -e (nginx >= 1.19.5) also sends what nginx logs before it has read its config to stderr
        early = ["-e", "stderr"] if _nginx_version(binary) >= (1, 19, 5) else []
        self.process = subprocess.Popen(  # its messages go to serve's stderr, beside tritonserver's
            [binary, "-p", str(self.workdir), "-c", str(self.config_path), *early],
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # its workers join its group, which the supervisor's guard kills
            preexec_fn=parent_death_signal(),
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LaunchError(
                    f"nginx (the HTTP guard) exited with code {self.process.returncode} as it started "
                    "(its own message is above)"
                )
            if _listening(self.process.pid, self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise LaunchError(
            f"nginx (the HTTP guard) did not listen on port {self.port} within {timeout_s:.0f} s"
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = STOP_GRACE_S) -> None:
        """SIGQUIT (nginx closes its port and lets open responses finish), SIGKILL to its group after
        ``timeout_s``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def _listening(pid: int, port: int) -> bool:
    if not os.path.exists("/proc/net/tcp"):
        time.sleep(0.5)  # no /proc: assume it listens once it has run a moment
        return True
    return listens_on(pid, port)


def _nginx_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run(
        [binary, "-v"], capture_output=True, text=True
    ).stderr  # "nginx version: nginx/1.22.1"
    try:
        return tuple(int(p) for p in out.strip().rsplit("/", 1)[1].split()[0].split("."))
    except (IndexError, ValueError):
        return (0,)


def main(argv: list[str] | None = None) -> int:
    """Runs a command (the Docker image's tritonserver) behind the guard; see docker/entrypoint.sh."""
    import argparse

    from pagetron.backend.serving.limits import request_body_limit
    from pagetron.backend.serving.supervisor import FALLBACK_MAX_MODEL_LEN, ProcessGroupGuard

    parser = argparse.ArgumentParser(
        prog="python -m pagetron.backend.serving.http_guard",
        description="Runs COMMAND (a tritonserver whose HTTP listener is on 127.0.0.1:UPSTREAM_PORT) with "
        "nginx on HOST:PORT in front of it; exits with COMMAND's code, SIGTERM and SIGINT go to COMMAND, "
        "and nothing outlives this process.",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    limit = parser.add_mutually_exclusive_group(required=True)
    limit.add_argument("--max-request-bytes", type=int)
    limit.add_argument("--engine-args-file", type=Path, help="default limit: from this max_model_len")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        parser.error("no COMMAND given (after --)")
    max_bytes = ns.max_request_bytes
    if max_bytes is None:
        engine_args = json.loads(ns.engine_args_file.read_text())
        max_bytes = request_body_limit(served_max_model_len(engine_args) or FALLBACK_MAX_MODEL_LEN)
    ns.workdir.mkdir(parents=True, exist_ok=True)
    guard = ProcessGroupGuard("http-guard")
    http_guard = HttpGuard(ns.host, ns.port, ns.upstream_port, max_bytes, ns.workdir)
    try:
        http_guard.start()
    except LaunchError as e:
        print(f"pagetron: error: {e}", file=sys.stderr, flush=True)
        guard.close()
        return 1
    guard.watch(http_guard.pid)
    print(
        f"pagetron: HTTP guard (nginx) on {ns.host}:{ns.port} -> 127.0.0.1:{ns.upstream_port}; request "
        f"bodies up to {max_bytes} bytes",
        file=sys.stderr,
        flush=True,
    )
    child = subprocess.Popen(command, start_new_session=True, preexec_fn=parent_death_signal())
    guard.watch(child.pid)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: child.send_signal(signum))
    try:
        while child.poll() is None:
            time.sleep(0.5)
            if not http_guard.running():
                print(
                    f"pagetron: nginx exited ({http_guard.process.returncode}); restarting it",
                    file=sys.stderr,
                )
                guard.forget(http_guard.pid)
                http_guard.start()
                guard.watch(http_guard.pid)
    finally:
        pid = http_guard.pid
        http_guard.stop()
        guard.forget(pid)
        guard.close()  # kills what is left of the command's process group (its stubs)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
