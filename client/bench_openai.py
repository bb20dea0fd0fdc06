"""What the OpenAI frontend costs: the same closed-loop chat workload sent straight to Triton over gRPC
(the `llm` model's `messages` input, which the frontend also uses) and through the frontend's
/v1/chat/completions, at one concurrency, streaming or not.

C workers each keep one request in flight. Every run has prompts of its own (same lengths, other words)
so the server's prefix cache cannot favour a later run; runs alternate direct, frontend, direct, ...
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

from pagetron.client.bench_prompts import prompt_rng, text_prompt
from pagetron.client.grpc_aio_client import AsyncTritonLLMClient
from pagetron.client.request import GenerateRequest


@dataclass(frozen=True)
class OverheadConfig:
    triton_url: str
    openai_url: str  # the frontend's base URL, ending in /v1
    api_key: str | None = None
    concurrency: int = 32
    num_requests: int = 128
    prompt_len: int = 128
    output_len: int = 128
    stream: bool = True
    rounds: int = 2
    model: str = "llm"

    def messages(self, run: int, index: int) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": text_prompt(prompt_rng(run, self.prompt_len, index), self.prompt_len)}
        ]

    def sampling(self) -> dict[str, Any]:
        return {"max_tokens": self.output_len, "ignore_eos": True, "temperature": 0.0}


async def _closed_loop(config: OverheadConfig, run: int, one) -> dict[str, Any]:
    """Runs num_requests through ``one(messages) -> output tokens`` with concurrency workers."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(config.num_requests):
        queue.put_nowait(i)
    tokens, latencies, errors = [], [], []

    async def worker() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            started = time.perf_counter()
            try:
                tokens.append(await one(config.messages(run, index)))
                latencies.append(time.perf_counter() - started)
            except Exception as e:  # counted and reported, the run goes on
                errors.append(f"{type(e).__name__}: {e}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    seconds = time.perf_counter() - started
    return {
        "output_tokens": sum(tokens),
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(sum(tokens) / seconds, 1),
        "e2e_ms_p50": round(1000 * statistics.median(latencies), 1) if latencies else None,
        "num_errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


async def _direct(config: OverheadConfig, client: AsyncTritonLLMClient, run: int) -> dict[str, Any]:
    async def one(messages) -> int:
        request = GenerateRequest(messages, config.sampling(), stream=config.stream)
        count = 0
        async for chunk in client.generate(request, timeout=600):
            count += chunk.num_tokens
        return count

    return await _closed_loop(config, run, one)


async def _frontend(config: OverheadConfig, http, run: int) -> dict[str, Any]:
    url = f"{config.openai_url}/chat/completions"

    async def one(messages) -> int:
        body = {"model": config.model, "messages": messages, "stream": config.stream, **config.sampling()}
        if not config.stream:
            response = await http.post(url, json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]
        body["stream_options"] = {"include_usage": True}
        usage = None
        async with http.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    usage = chunk.get("usage") or usage
        return usage["completion_tokens"]

    return await _closed_loop(config, run, one)


async def measure_overhead(config: OverheadConfig) -> dict[str, Any]:
    import httpx

    headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    async with (
        AsyncTritonLLMClient(config.triton_url, config.model) as client,
        httpx.AsyncClient(headers=headers, limits=limits, timeout=600) as http,
    ):
        warmup = OverheadConfig(**{**config.__dict__, "num_requests": config.concurrency, "output_len": 4})
        await _direct(warmup, client, run=10_000)
        await _frontend(warmup, http, run=10_001)
        rounds = []
        for r in range(config.rounds):
            direct = await _direct(config, client, run=2 * r)
            frontend = await _frontend(config, http, run=2 * r + 1)
            ratio = frontend["output_tokens_per_s"] / direct["output_tokens_per_s"]
            rounds.append({"direct": direct, "frontend": frontend, "frontend_over_direct": round(ratio, 3)})
    return {
        "workload": "openai-overhead",
        "config": config.__dict__,
        "rounds": rounds,
        "frontend_over_direct_median": round(statistics.median(r["frontend_over_direct"] for r in rounds), 3),
    }


def format_overhead(result: dict[str, Any]) -> str:
    lines = [f"{'round':>6}{'direct tok/s':>14}{'frontend tok/s':>16}{'frontend/direct':>17}{'errors':>8}"]
    for i, r in enumerate(result["rounds"]):
        errors = r["direct"]["num_errors"] + r["frontend"]["num_errors"]
        lines.append(
            f"{i:>6}{r['direct']['output_tokens_per_s']:>14.1f}{r['frontend']['output_tokens_per_s']:>16.1f}"
            f"{r['frontend_over_direct']:>17.3f}{errors:>8}"
        )
    lines.append(f"median frontend/direct: {result['frontend_over_direct_median']:.3f}")
    return "\n".join(lines)
