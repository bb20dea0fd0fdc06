"""Serving benchmark (workload L): percentile math, level summary, prompts, requests, arguments (no server);
a tiny closed-loop run against the real tritonserver (`triton_server` fixture)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from pagetron.client.bench_prompts import WORDS, prompt_rng, text_prompt, token_id_prompt
from pagetron.client.bench_serving import BenchConfig
from pagetron.client.bench_stats import RequestRecord, format_table, percentile, summarize_level
from pagetron.client.cli import add_client_commands, run_bench


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pagetron")
    add_client_commands(p.add_subparsers(dest="command", required=True))
    return p


# ---- percentiles -----------------------------------------------------------------------------------------


def test_percentile_exact_values():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_percentile_matches_numpy_linear():
    values = np.random.default_rng(3).exponential(size=101).tolist()
    for q in (1, 25, 50, 90, 99, 99.9):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_rejects_out_of_range():
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# ---- level summary ---------------------------------------------------------------------------------------


def test_summarize_level_exact():
    records = [
        RequestRecord(ttft_s=0.010, itl_s=[0.002, 0.004], e2e_s=0.020, output_tokens=3, input_tokens=8),
        RequestRecord(ttft_s=0.030, itl_s=[0.006], e2e_s=0.040, output_tokens=2, input_tokens=8),
        RequestRecord(error="[INVALID_ARG] bad", e2e_s=0.001),
    ]
    row = summarize_level(4, records, duration_s=0.5)
    assert row == {
        "concurrency": 4,
        "num_requests": 2,
        "num_errors": 1,
        "first_error": "[INVALID_ARG] bad",
        "duration_s": 0.5,
        "output_tokens": 5,
        "output_tokens_per_s": 10.0,
        "total_tokens_per_s": 42.0,
        "requests_per_s": 4.0,
        "ttft_ms_p50": 20.0,
        "ttft_ms_p99": 29.8,
        "ttft_ms_mean": 20.0,
        "itl_ms_p50": 4.0,
        "itl_ms_p99": 5.96,
        "itl_ms_mean": 4.0,
        "e2e_ms_p50": 30.0,
        "e2e_ms_p99": 39.8,
        "mean_input_tokens": 8.0,
        "mean_output_tokens": 2.5,
    }


def test_summarize_level_all_failed():
    row = summarize_level(1, [RequestRecord(error="x")], duration_s=1.0)
    assert row["num_requests"] == 0 and row["num_errors"] == 1
    assert row["ttft_ms_p50"] is None and row["itl_ms_p99"] is None and row["mean_output_tokens"] is None


def test_format_table():
    row = summarize_level(2, [RequestRecord(ttft_s=0.01, itl_s=[0.002], e2e_s=0.02, output_tokens=2)], 1.0)
    assert format_table([row]).splitlines() == [
        "conc  reqs  errors  TTFT p50 ms  TTFT p99 ms  ITL p50 ms  ITL p99 ms  out tok/s  req/s",
        "   2     1       0        10.00        10.00        2.00        2.00       2.00   1.00",
    ]


# ---- prompts and requests --------------------------------------------------------------------------------


def test_token_id_prompts_are_seeded_and_distinct_across_levels():
    first = token_id_prompt(prompt_rng(0, 1, 0), 512, 32000)
    assert first[:5] == [16756, 28482, 31775, 17872, 9763]
    assert len(first) == 512 and min(first) >= 100 and max(first) < 32000
    assert token_id_prompt(prompt_rng(0, 1, 0), 512, 32000) == first
    assert token_id_prompt(prompt_rng(0, 8, 0), 512, 32000) != first
    assert token_id_prompt(prompt_rng(1, 1, 0), 512, 32000) != first


def test_text_prompt_has_requested_word_count():
    prompt = text_prompt(prompt_rng(0, 1, 3), 40)
    assert len(prompt.split(" ")) == 40 and set(prompt.split(" ")) <= set(WORDS)
    assert text_prompt(prompt_rng(0, 1, 3), 40) == prompt


def test_bench_requests():
    config = BenchConfig(prompt_len=6, output_len=8, token_ids=True, vocab_size=1000)
    request = config.make_request(8, 2)
    assert request.prompt == token_id_prompt(prompt_rng(0, 8, 2), 6, 1000)
    assert dict(request.sampling_params) == {"max_tokens": 8, "ignore_eos": True, "temperature": 0.0}
    assert (request.stream, request.return_num_input_tokens, request.request_id) == (True, True, "bench-8-2")
    sampled = BenchConfig(seed=1, sampling_params={"temperature": 0.7}).make_request(8, 2)
    assert dict(sampled.sampling_params) == {
        "max_tokens": 256,
        "ignore_eos": True,
        "temperature": 0.7,
        "seed": 1_000_003 + 8 * 10_007 + 2,
    }
    assert isinstance(BenchConfig(prompt_len=5).make_request(1, 0).prompt, str)


def test_requests_per_level():
    assert [BenchConfig().requests_for(c) for c in (1, 8, 64)] == [8, 32, 256]
    assert BenchConfig(num_requests=5).requests_for(64) == 5
    assert BenchConfig(duration=2.0).requests_for(64) is None


def test_bench_args():
    ns = parser().parse_args(["bench-serving"])
    assert (ns.concurrency, ns.prompt_len, ns.output_len, ns.token_ids, ns.func) == (
        (1, 8, 64, 256),
        512,
        256,
        False,
        run_bench,
    )
    ns = parser().parse_args(["bench-serving", "--concurrency", "1,8", "--token-ids", "--json", "out.json"])
    assert (ns.concurrency, ns.token_ids, ns.json_path) == ((1, 8), True, "out.json")


@pytest.mark.parametrize("bad", ["0", "1,x", "", "-4"])
def test_bench_rejects_bad_concurrency(bad):
    with pytest.raises(SystemExit):
        parser().parse_args(["bench-serving", "--concurrency", bad])


# ---- against the real tritonserver -------------------------------------------------------------------

LEVEL_KEYS = {
    "concurrency", "num_requests", "num_errors", "first_error", "duration_s", "output_tokens",
    "output_tokens_per_s", "total_tokens_per_s", "requests_per_s", "ttft_ms_p50", "ttft_ms_p99",
    "ttft_ms_mean", "itl_ms_p50", "itl_ms_p99", "itl_ms_mean", "e2e_ms_p50", "e2e_ms_p99",
    "mean_input_tokens", "mean_output_tokens",
}  # fmt: skip


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    ns = parser().parse_args(["bench-serving", *args])
    status = ns.func(ns)
    return status, capsys.readouterr().out


def test_tiny_level_json(triton_server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--url", triton_server.grpc_url, "--concurrency", "2", "--num-requests", "4"]
    status, table = run_cli([*args, "--output-len", "8", "--prompt-len", "16", "--json", str(out)], capsys)
    assert status == 0
    results = json.loads(out.read_text())
    assert set(results) == {"workload", "date", "command", "config", "levels"}
    assert results["workload"] == "L" and results["config"]["concurrency"] == [2]
    (level,) = results["levels"]
    assert set(level) == LEVEL_KEYS
    assert (level["concurrency"], level["num_requests"], level["num_errors"], level["first_error"]) == (
        2, 4, 0, None,
    )  # fmt: skip
    assert (level["output_tokens"], level["mean_output_tokens"], level["mean_input_tokens"]) == (
        32,
        8.0,
        16.0,
    )
    assert 0 < level["ttft_ms_p50"] <= level["ttft_ms_p99"] < level["e2e_ms_p99"]
    assert 0 < level["itl_ms_p50"] <= level["itl_ms_p99"]
    assert level["output_tokens_per_s"] == pytest.approx(32 / level["duration_s"], rel=1e-2)
    assert level["requests_per_s"] == pytest.approx(4 / level["duration_s"], rel=1e-2)
    assert table.splitlines()[1].split()[:3] == ["2", "4", "0"]


def test_token_id_prompts(triton_server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["--url", triton_server.grpc_url, "--concurrency", "1", "--num-requests", "2", "--warmup", "0"]
    args += ["--token-ids", "--vocab-size", "49152", "--prompt-len", "24", "--output-len", "4"]
    status, _ = run_cli([*args, "--json", str(out)], capsys)
    assert status == 0
    (level,) = json.loads(out.read_text())["levels"]
    assert (level["num_requests"], level["mean_input_tokens"], level["output_tokens"]) == (2, 24.0, 8)


def test_failed_requests_make_exit_status_nonzero(triton_server, capsys):
    args = ["--url", triton_server.grpc_url, "--concurrency", "1", "--num-requests", "1", "--warmup", "0"]
    status, table = run_cli([*args, "--output-len", "2", "--sampling-params", '{"bogus_key": 1}'], capsys)
    assert status == 1
    assert table.splitlines()[1].split()[:3] == ["1", "0", "1"]
