"""What one engine step did, in the terms of vLLM's metrics (counters, gauges, latency observations)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagetron.backend.engine.llm_engine import LLMEngine
from pagetron.backend.engine.outputs import RequestOutput


@dataclass
class StepStats:
    num_prompt_tokens: int = 0  # prompts whose first token came out this step
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    time_to_first_token: list[float] = field(default_factory=list)
    time_per_output_token: list[float] = field(default_factory=list)
    e2e_latency: list[float] = field(default_factory=list)
    request_prompt_tokens: list[int] = field(default_factory=list)
    request_generation_tokens: list[int] = field(default_factory=list)
    # per LoRA adapter (lora_name): requests finished and tokens generated this step; adapters on the device
    lora_requests: dict[str, int] = field(default_factory=dict)
    lora_generation_tokens: dict[str, int] = field(default_factory=dict)
    loras_resident: int = 0


class StepStatsCollector:
    """Turns the engine's running totals into per-step increments, plus per-request observations."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._preemptions = self._queries = self._hits = 0

    def begin(self) -> StepStats:
        bm, sched = self.engine.block_manager, self.engine.scheduler
        stats = StepStats(
            num_preemptions=sched.num_preemptions - self._preemptions,
            prefix_cache_queries=bm.prefix_cache_queries - self._queries,
            prefix_cache_hits=bm.prefix_cache_hits - self._hits,
            num_running=len({s.request_id for s in sched.running}),
            num_waiting=len({s.request_id for s in sched.waiting}),
            kv_cache_usage=bm.usage,
            loras_resident=self.engine.executor.num_resident_loras(),
        )
        self._preemptions, self._queries, self._hits = (
            sched.num_preemptions,
            bm.prefix_cache_queries,
            bm.prefix_cache_hits,
        )
        return stats

    @staticmethod
    def observe(
        stats: StepStats,
        out: RequestOutput,
        arrival: float,
        last_token_time: float | None,
        num_generated: int,
        now: float,
        lora_name: str | None = None,
    ) -> int:
        """Records one request's output of this step; returns its new total of generated tokens."""
        new_tokens = sum(len(o.delta_token_ids) for o in out.outputs)
        stats.num_generation_tokens += new_tokens
        if lora_name is not None:
            tokens = stats.lora_generation_tokens
            tokens[lora_name] = tokens.get(lora_name, 0) + new_tokens
            if out.finished:
                stats.lora_requests[lora_name] = stats.lora_requests.get(lora_name, 0) + 1
        if last_token_time is None:
            stats.num_prompt_tokens += len(out.prompt_token_ids)
            stats.time_to_first_token.append(now - arrival)
        elif new_tokens:
            stats.time_per_output_token.append(now - last_token_time)
        num_generated += new_tokens
        if out.finished:
            stats.e2e_latency.append(now - arrival)
            stats.request_prompt_tokens.append(len(out.prompt_token_ids))
            stats.request_generation_tokens.append(num_generated)
        return num_generated
