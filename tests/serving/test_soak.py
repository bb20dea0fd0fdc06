"""Soak: the real perf_analyzer streams at concurrency 64 for PAGETRON_SOAK_S seconds (120 by default) of
short greedy requests. Zero failed requests, every KV block free afterwards, and the server's memory
(tritonserver plus the model's stub) grows by less than MEMORY_GROWTH_BOUND_MB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import start_server

from grpc_helpers import scrape_metrics

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "perf_analyzer_configs" / "run_perf_analyzer.py"
CONCURRENCY = 64
SOAK_S = float(os.environ.get("PAGETRON_SOAK_S", "120"))
MEMORY_GROWTH_BOUND_MB = 150
TOKENS_PER_REQUEST = 4  # perf_analyzer_configs/smoke.json


def rss_mb(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def perf_analyzer_level(url: str, requests: int, out: Path) -> dict:
    command = [sys.executable, str(RUNNER), "--url", url, "--concurrency", str(CONCURRENCY)]
    command += ["--request-count", str(requests), "--timeout", str(SOAK_S * 3 + 120), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SOAK_S * 3 + 180)
    assert done.returncode == 0, done.stdout + done.stderr
    [level] = json.loads((out / "summary.json").read_text())["levels"]
    return level


def test_soak_under_perf_analyzer(tmp_path):
    server = start_server(tmp_path, engine_args={"max_num_seqs": CONCURRENCY})
    try:
        pids = [server.pid, *server.stub_pids()]
        warm = perf_analyzer_level(server.grpc_url, 4 * CONCURRENCY, tmp_path / "warm")  # also the rate
        before_mb = rss_mb(pids)
        requests = max(4 * CONCURRENCY, int(warm["requests_per_s"] * SOAK_S))
        started = time.monotonic()
        level = perf_analyzer_level(server.grpc_url, requests, tmp_path / "soak")
        seconds = time.monotonic() - started
        after_mb = rss_mb(pids)
        assert level["exit_code"] == 0 and level["errors"] == []
        assert level["requests"] == requests and level["requests_without_response"] == 0
        assert level["output_tokens"] == requests * TOKENS_PER_REQUEST
        deadline = time.monotonic() + 10
        while (m := scrape_metrics(server.metrics_url))["vllm:num_requests_running"] or m[
            "vllm:gpu_cache_usage_perc"
        ]:
            assert time.monotonic() < deadline, m
            time.sleep(0.2)
        assert after_mb - before_mb < MEMORY_GROWTH_BOUND_MB, (before_mb, after_mb)
        print(
            f"\nsoak: {requests} requests at concurrency {CONCURRENCY} in {seconds:.0f} s "
            f"({level['requests_per_s']:.1f} req/s), 0 failed, KV back to 0, server RSS "
            f"{before_mb:.0f} -> {after_mb:.0f} MB (bound +{MEMORY_GROWTH_BOUND_MB} MB)"
        )
    finally:
        server.stop()
