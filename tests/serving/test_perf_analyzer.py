"""perf_analyzer smoke: the real perf_analyzer (tritonclient 2.51, gRPC streaming) against the real server.

perf_analyzer_configs/run_perf_analyzer.py sends 4 requests at each of concurrency 1 and 2, using
perf_analyzer_configs/smoke.json: three prompts, greedy, 4 tokens each, ignore_eos.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from pagetron.backend import SamplingParams

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "perf_analyzer_configs" / "run_perf_analyzer.py"
REQUESTS_PER_LEVEL = 4
TOKENS_PER_REQUEST = 4


def greedy_text(llm, prompts: list[str]) -> dict[str, str]:
    """The served model's greedy continuations, offline, as smoke.json asks for them."""
    params = SamplingParams(temperature=0, max_tokens=TOKENS_PER_REQUEST, ignore_eos=True)
    return {p: o.outputs[0].text for p, o in zip(prompts, llm.generate(prompts, params, use_tqdm=False))}


def test_perf_analyzer_streaming_smoke(triton_server, tiny_llm, tmp_path):
    out = tmp_path / "perf_analyzer"
    command = [sys.executable, str(RUNNER), "--url", triton_server.grpc_url, "--concurrency", "1:2"]
    command += ["--request-count", str(REQUESTS_PER_LEVEL), "--timeout", "60", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr

    levels = json.loads((out / "summary.json").read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    for level in levels:
        assert level["exit_code"] == 0
        assert level["errors"] == []
        assert level["requests"] == REQUESTS_PER_LEVEL
        assert level["requests_without_response"] == 0
        assert level["output_tokens"] == REQUESTS_PER_LEVEL * TOKENS_PER_REQUEST
        assert level["requests_per_s"] > 0
        assert level["output_tokens_per_s"] > 0
        assert level["ttft_ms_p50"] > 0

    # perf_analyzer's own report: one CSV row per level, nonzero throughput
    with (out / "perf_analyzer.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(row["Concurrency"]) for row in rows] == [1, 2]
    assert all(float(row["Inferences/Second"]) > 0 for row in rows)

    # what was streamed: each request's responses join into the greedy continuation of its prompt
    smoke = json.loads((REPO / "perf_analyzer_configs" / "smoke.json").read_text())
    expected = greedy_text(tiny_llm, [entry["text_input"][0] for entry in smoke["data"]])
    for level in (1, 2):
        export = json.loads((out / f"c{level}.profile.json").read_text())
        requests = [r for experiment in export["experiments"] for r in experiment["requests"]]
        assert len(requests) == REQUESTS_PER_LEVEL
        for request in requests:
            prompt = request["request_inputs"]["text_input"]
            streamed = "".join(response.get("text_output", "") for response in request["response_outputs"])
            assert streamed == expected[prompt]
            assert len(request["response_timestamps"]) >= 2  # streamed, not one final response
