"""Serving benchmark, workload L (docs/benchmarks.md): closed-loop gRPC streaming load on the `llm` model.

At each concurrency level C, C workers each keep exactly one request in flight: send, read the stream to
its end, send the next. A level ends after --num-requests requests (default max(8, 4 * C)) or, with
--duration, when no new request may start. Each level reports TTFT, inter-token latency (ms per token,
between streamed responses of a request) and end-to-end latency percentiles, output tokens/s and
requests/s. JSON (--json): {"workload", "date", "command", "config", "levels": [row per level]}; the row
keys are those of bench_stats.summarize_level.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pagetron.client.bench_prompts import prompt_rng, text_prompt, token_id_prompt
from pagetron.client.bench_stats import RequestRecord, format_table, summarize_level
from pagetron.client.errors import TritonRequestError
from pagetron.client.grpc_aio_client import AsyncTritonLLMClient
from pagetron.client.request import GenerateRequest

# Streams share a gRPC channel up to this many; more concurrent streams open more channels.
STREAMS_PER_CHANNEL = 64


@dataclass(frozen=True)
class BenchConfig:
    url: str = "localhost:8001"
    model: str = "llm"
    concurrency: tuple[int, ...] = (1, 8, 64, 256)
    prompt_len: int = 512
    output_len: int = 256
    token_ids: bool = False
    vocab_size: int = 32000
    num_requests: int | None = None
    duration: float | None = None
    warmup: int = 1
    seed: int = 0
    timeout: float = 600.0
    sampling_params: dict[str, Any] = field(default_factory=dict)

    def requests_for(self, concurrency: int) -> int | None:
        if self.duration is not None:
            return self.num_requests
        return self.num_requests if self.num_requests is not None else max(8, 4 * concurrency)

    def make_request(self, level: int, index: int) -> GenerateRequest:
        rng = prompt_rng(self.seed, level, index)
        if self.token_ids:
            prompt: str | list[int] = token_id_prompt(rng, self.prompt_len, self.vocab_size)
        else:
            prompt = text_prompt(rng, self.prompt_len)
        params: dict[str, Any] = {"max_tokens": self.output_len, "ignore_eos": True, "temperature": 0.0}
        params.update(self.sampling_params)
        if params.get("temperature", 0.0) > 0.0:
            params.setdefault("seed", self.seed * 1_000_003 + level * 10_007 + index)
        return GenerateRequest(
            prompt,
            params,
            stream=True,
            return_num_input_tokens=True,
            request_id=f"bench-{level}-{index}",
        )


async def run_request(
    client: AsyncTritonLLMClient, request: GenerateRequest, timeout: float
) -> RequestRecord:
    record = RequestRecord()
    start = last = time.perf_counter()
    try:
        async for chunk in client.generate(request, timeout=timeout):
            now = time.perf_counter()
            if chunk.num_input_tokens is not None:
                record.input_tokens = chunk.num_input_tokens
            if chunk.num_tokens == 0:
                continue
            if record.ttft_s is None:
                record.ttft_s = now - start
            else:
                record.itl_s.append((now - last) / chunk.num_tokens)
            last = now
            record.output_tokens += chunk.num_tokens
    except TritonRequestError as e:
        record.error = str(e)
    record.e2e_s = time.perf_counter() - start
    return record


async def run_level(config: BenchConfig, concurrency: int) -> dict[str, Any]:
    channels = math.ceil(concurrency / STREAMS_PER_CHANNEL)
    clients = [AsyncTritonLLMClient(config.url, config.model) for _ in range(channels)]
    limit = config.requests_for(concurrency)
    indices = itertools.count()
    records: list[RequestRecord] = []
    start = time.perf_counter()

    def may_start(index: int) -> bool:
        if limit is not None and index >= limit:
            return False
        return config.duration is None or time.perf_counter() - start < config.duration

    async def worker(client: AsyncTritonLLMClient) -> None:
        while may_start(index := next(indices)):
            records.append(await run_request(client, config.make_request(concurrency, index), config.timeout))

    try:
        await asyncio.gather(*(worker(clients[w % channels]) for w in range(concurrency)))
    finally:
        for client in clients:
            await client.close()
    return summarize_level(concurrency, records, time.perf_counter() - start)


async def warm_up(config: BenchConfig) -> None:
    """Sequential requests outside any level (level 0 prompts); a failure here aborts the run."""
    async with AsyncTritonLLMClient(config.url, config.model) as client:
        for index in range(config.warmup):
            record = await run_request(client, config.make_request(0, index), config.timeout)
            if record.error is not None:
                raise TritonRequestError(f"warm-up request failed: {record.error}", "WARMUP")


async def run_benchmark(config: BenchConfig, log: Any = None) -> dict[str, Any]:
    await warm_up(config)
    levels = []
    for concurrency in config.concurrency:
        levels.append(await run_level(config, concurrency))
        if log is not None:
            row = levels[-1]
            print(
                f"concurrency {concurrency}: {row['num_requests']} requests, {row['num_errors']} errors, "
                f"{row['output_tokens_per_s']} output tok/s",
                file=log,
                flush=True,
            )
    return {
        "workload": "L",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "config": {**asdict(config), "concurrency": list(config.concurrency)},
        "levels": levels,
    }


def run_bench_serving(config: BenchConfig, json_path: str | None = None) -> int:
    """Run, print the table, write the JSON; exit status 1 if the run failed or any request failed."""
    try:
        results = asyncio.run(run_benchmark(config, log=sys.stderr))
    except TritonRequestError as e:
        print(f"pagetron bench-serving: error: {e}", file=sys.stderr)
        return 1
    print(format_table(results["levels"]))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 1 if any(level["num_errors"] for level in results["levels"]) else 0
