"""What the HTTP guard costs: streaming generation (HTTP generate_stream, server-sent events) through the
guard on `pagetron serve`'s public HTTP port vs straight to tritonserver's own HTTP listener behind it.

    python -m pagetron.backend.benchmarks.http_guard_overhead [--model PATH] [--concurrency 16]
        [--num-requests 64] [--max-tokens 128] [--rounds 3] [--compare-asgi] [--json out.json]

It starts `pagetron serve` (the model given, default SmolLM2), then runs the same closed-loop workload
(greedy, ignore_eos, a fresh prompt per request so the prefix cache favours neither side) straight to
Triton and through the guard, alternating which goes first each round; tokens/s is the output tokens
counted from the events over the run's wall time. ``--compare-asgi`` also runs the workload through a
minimal streaming ASGI proxy on uvicorn (httpx to Triton), the alternative to nginx (not what serve
runs; it is here only to be measured).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pagetron.backend.serving.constants import ADMIN_KEY_ENV
from pagetron.backend.serving.launcher import free_port

_ASGI_PROXY = r"""
import sys, httpx, uvicorn
upstream, port, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = httpx.AsyncClient(base_url=upstream, timeout=None, limits=httpx.Limits(max_keepalive_connections=64))
HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"}

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    headers = [(k, v) for k, v in scope["headers"] if k not in HOP]
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and int(length) > limit:
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > limit:
            await send({"type": "http.response.start", "status": 413, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if not message.get("more_body"):
            break
    headers = [(k, b"application/json" if k == b"content-type" and b"form-urlencoded" in v.lower() else v)
               for k, v in headers]
    path = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
    request = client.build_request(scope["method"], path.decode(), headers=headers, content=bytes(body))
    response = await client.send(request, stream=True)
    try:
        out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP]
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await response.aclose()

uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


async def _one(client, url: str, prompt: str, max_tokens: int) -> int:
    body = {
        "text_input": prompt,
        "stream": True,
        "parameters": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0},
    }
    tokens = 0
    async with client.stream("POST", f"{url}/v2/models/llm/generate_stream", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(f"{url}: {event['error']}")
                ids = event.get("output_ids", [])
                tokens += len(ids) if isinstance(ids, list) else 1  # one id comes as a number
    return tokens


async def _run(url: str, tag: str, num_requests: int, concurrency: int, max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(num_requests):
            queue.put_nowait(f"Request {tag}-{i}: once upon a time, in a land far away, there lived a")
        counts: list[int] = []

        async def worker() -> None:
            while not queue.empty():
                counts.append(await _one(client, url, queue.get_nowait(), max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {"tokens": sum(counts), "seconds": seconds, "tokens_per_s": sum(counts) / seconds}


def _group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group ``pgid`` (Linux /proc)."""
    from pagetron.backend.serving.launcher import group_processes

    total = 0
    for pid, _ in group_processes(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def _wait_for(pattern: str, log: Path, process: subprocess.Popen, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        if process.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"`pagetron serve` did not get ready: {log.read_text(errors='replace')[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--compare-asgi", action="store_true")
    parser.add_argument("--json", dest="json_path")
    ns = parser.parse_args(argv)

    ports = {name: free_port() for name in ("http", "grpc", "metrics")}
    env = {**os.environ, ADMIN_KEY_ENV: os.environ.get(ADMIN_KEY_ENV) or "bench-admin-key"}
    cmd = [sys.executable, "-m", "pagetron.backend.cli", "serve",
           "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
           "--metrics-port", str(ports["metrics"]), "--max-model-len", str(ns.max_model_len),
           "--max-num-seqs", str(max(ns.concurrency, 8)), "--kv-cache-memory-gb", "0.5"]  # fmt: skip
    if ns.model:
        cmd += ["--model", ns.model]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        serve = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
        asgi = None
        try:
            internal = int(_wait_for(r"tritonserver HTTP on 127\.0\.0\.1:(\d+)", log, serve, 120).group(1))
            _wait_for(r"Pagetron is serving", log, serve, 600)
            targets = {"direct": f"http://127.0.0.1:{internal}", "nginx": f"http://127.0.0.1:{ports['http']}"}
            from pagetron.backend.serving.launcher import port_holders

            nginx_group = os.getpgid(port_holders(ports["http"])[0][0])
            server_group = os.getpgid(port_holders(internal)[0][0])
            groups = {"direct": None, "nginx": nginx_group}
            if ns.compare_asgi:
                asgi_port = free_port()
                asgi = subprocess.Popen(
                    [sys.executable, "-c", _ASGI_PROXY, targets["direct"], str(asgi_port), str(1 << 20)],
                    start_new_session=True,
                )
                groups["asgi"] = asgi.pid
                targets["asgi"] = f"http://127.0.0.1:{asgi_port}"
                time.sleep(3)  # uvicorn's start-up; the warm-up request below waits for it anyway
            for name, url in targets.items():  # warm-up: connections, the engine's first batches
                asyncio.run(_run(url, f"warm-{name}", ns.concurrency, ns.concurrency, 8))
            runs: dict[str, list[dict]] = {name: [] for name in targets}
            names = list(targets)
            for r in range(ns.rounds):
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    proxy_before = _group_cpu_s(groups[name]) if groups[name] else 0.0
                    server_before = _group_cpu_s(server_group)
                    result = asyncio.run(
                        _run(targets[name], f"{r}-{name}", ns.num_requests, ns.concurrency, ns.max_tokens)
                    )
                    result["proxy_cpu_s"] = (
                        _group_cpu_s(groups[name]) if groups[name] else 0.0
                    ) - proxy_before
                    result["server_cpu_s"] = _group_cpu_s(server_group) - server_before
                    runs[name].append(result)
                    print(
                        f"round {r + 1} {name:7s} {result['tokens']} tokens in {result['seconds']:.2f} s: "
                        f"{result['tokens_per_s']:.1f} tok/s; CPU: proxy {result['proxy_cpu_s']:.2f} s, "
                        f"tritonserver + stub {result['server_cpu_s']:.2f} s",
                        flush=True,
                    )
        finally:
            if asgi is not None:
                asgi.kill()
                asgi.wait()
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(120)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
    medians = {name: statistics.median(r["tokens_per_s"] for r in results) for name, results in runs.items()}
    # each round's proxied run against its own direct run (they ran back to back), then the median
    paired = {
        name: statistics.median(
            p["tokens_per_s"] / d["tokens_per_s"] for p, d in zip(runs[name], runs["direct"])
        )
        for name in runs
        if name != "direct"
    }
    proxy_cpu = {
        name: sum(r["proxy_cpu_s"] for r in runs[name]) / sum(r["server_cpu_s"] for r in runs[name])
        for name in paired
    }
    summary = {
        "config": {k: v for k, v in vars(ns).items() if k != "json_path"},
        "runs": runs,
        "median_tokens_per_s": medians,
        "overhead": {name: 1 - medians[name] / medians["direct"] for name in paired},
        "paired_overhead": {name: 1 - ratio for name, ratio in paired.items()},
        "proxy_cpu_per_server_cpu": proxy_cpu,
    }
    for name in paired:
        print(
            f"{name}: median {medians[name]:.1f} tok/s vs direct {medians['direct']:.1f} tok/s: overhead "
            f"{100 * summary['overhead'][name]:.2f}% (median of the rounds' pairs "
            f"{100 * summary['paired_overhead'][name]:.2f}%); the proxy used "
            f"{100 * proxy_cpu[name]:.2f}% as much CPU as tritonserver and its stub"
        )
    if ns.json_path:
        Path(ns.json_path).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
