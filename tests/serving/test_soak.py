"""Soak: the real perf_analyzer streams at concurrency 64 for PAGETRON_SOAK_S seconds (6 by default;
`make soak` runs 120) of short greedy requests against the session's server (a tiny model: the soak is
about the server, not the model). Zero failed requests, every KV block free afterwards, and the server's
memory (tritonserver plus the model's stub) grows by less than MEMORY_GROWTH_BOUND_MB."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import time
from pathlib import Path

from grpc_helpers import scrape_metrics

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "perf_analyzer_configs" / "run_perf_analyzer.py"
CONCURRENCY = 64
SOAK_S = float(os.environ.get("PAGETRON_SOAK_S", "6"))
MEMORY_GROWTH_BOUND_MB = 150
TOKENS_PER_REQUEST = 4  # perf_analyzer_configs/smoke.json
COUNTERS = ("vllm:e2e_request_latency_seconds_count", "vllm:generation_tokens_total")
METRICS_PORT: dict[str, int] = {}  # gRPC url -> metrics port of the server under test


def rss_mb(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def load_runner():
    spec = importlib.util.spec_from_file_location("run_perf_analyzer", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perf_analyzer_level(url: str, requests: int, out: Path) -> dict:
    """The real perf_analyzer at CONCURRENCY for ``requests`` requests; what the server counted meanwhile.

    NOTE: no --profile-export-file: perf_analyzer 2.51 now and then leaves that export truncated after
    a long streaming run (seen in CI), so completions are counted on the server's own metrics instead.
    """
    runner = load_runner()
    out.mkdir(parents=True)
    command = [str(runner.perf_analyzer_binary()), "-m", "llm", "-i", "grpc", "-u", url, "--streaming"]
    command += ["--input-data", str(runner.HERE / "smoke.json"), "--concurrency-range", str(CONCURRENCY)]
    command += ["--request-count", str(requests), "-f", str(out / "perf_analyzer.csv")]
    metrics_url = f"http://{url.rsplit(':', 1)[0]}:{METRICS_PORT[url]}/metrics"
    before = scrape_metrics(metrics_url)
    started = time.monotonic()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=SOAK_S * 3 + 180, env=runner.perf_analyzer_env()
    )
    seconds = time.monotonic() - started
    (out / "perf_analyzer.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (out / "perf_analyzer.csv").open() as f:
        [row] = list(csv.DictReader(f))
    # the metrics thread applies counts every 0.25 s: wait until all asked for finished and nothing moves
    deadline = time.monotonic() + 10
    previous = None
    while True:
        after = scrape_metrics(metrics_url)
        finished = (
            after["vllm:e2e_request_latency_seconds_count"] - before["vllm:e2e_request_latency_seconds_count"]
        )
        settled = previous is not None and all(after[k] == previous[k] for k in COUNTERS)
        if (finished >= requests and settled) or time.monotonic() > deadline:
            break
        previous = after
        time.sleep(0.5)
    return {
        "seconds": seconds,
        "requests_per_s": requests / seconds,
        "perf_analyzer_infer_per_s": float(row["Inferences/Second"]),
        "finished": finished,
        "tokens": after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"],
        "metrics": after,
    }


def test_soak_under_perf_analyzer(triton_server, tmp_path):
    """Concurrency 64 on the session server (max_num_seqs 32): half the streams wait in its queue."""
    server = triton_server
    METRICS_PORT[server.grpc_url] = server.metrics_port
    pids = [server.pid, *server.stub_pids()]
    warm = perf_analyzer_level(server.grpc_url, 2 * CONCURRENCY, tmp_path / "warm")  # also the rate
    before_mb = rss_mb(pids)
    requests = max(2 * CONCURRENCY, int(warm["requests_per_s"] * SOAK_S))
    level = perf_analyzer_level(server.grpc_url, requests, tmp_path / "soak")
    after_mb = rss_mb(pids)
    # every request the server took finished, with every token (a failed one would also fail
    # perf_analyzer's exit code); perf_analyzer may send a few more than asked to fill its window
    assert level["finished"] >= requests and level["tokens"] == level["finished"] * TOKENS_PER_REQUEST
    deadline = time.monotonic() + 10
    while (m := scrape_metrics(server.metrics_url))["vllm:num_requests_running"] or m[
        "vllm:gpu_cache_usage_perc"
    ]:
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    assert after_mb - before_mb < MEMORY_GROWTH_BOUND_MB, (before_mb, after_mb)
    print(
        f"\nsoak: {level['finished']:.0f} requests at concurrency {CONCURRENCY} "
        f"in {level['seconds']:.0f} s "
        f"({level['requests_per_s']:.1f} req/s), 0 failed, KV back to 0, server RSS "
        f"{before_mb:.0f} -> {after_mb:.0f} MB (bound +{MEMORY_GROWTH_BOUND_MB} MB)"
    )
